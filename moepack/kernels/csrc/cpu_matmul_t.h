// matmul_t (h @ W[rows]: a weighted sum of rows, the down projection's form) for q2/q4 on x86: a zmm
// version (vpermps table lookups) and a ymm version (codes widened and converted, FMA); other widths and
// bits use the fp32 LUT kernels of cpu_kernels.h (k_qmatmul_t). Included by the x86 isa_*.cpp files
// after cpu_kernels.h, with MOEPACK_Q8_VEC = 64 or 32 (cpu_table.h says why nothing here may use
// library templates).
#pragma once
#include <cstdint>

#include "cpu_table.h"

namespace {

// The NR rows starting at i of a matmul_t tile: their codes, the codes of the next NR rows (prefetched:
// pages restart the hardware prefetcher), their group metadata, and their weights h[t][i + r].
// False when every weight is zero (the rows add nothing).
template <int NT, int NR>
inline bool mt_row_setup(const moepack_cpu::QMat& m, const float* h, int64_t n, const int64_t* rows, int64_t i,
                         const uint8_t** cp, const uint8_t** pf, RowMeta* ri, float (*hv)[NT]) {
  bool any = false;
  for (int r = 0; r < NR; ++r) {
    const int64_t row = rows ? rows[i + r] : i + r;
    cp[r] = m.codes + row * m.row_bytes;
    const int64_t next = i + NR + r < n ? (rows ? rows[i + NR + r] : i + NR + r) : row;
    pf[r] = m.codes + next * m.row_bytes;
    ri[r] = row_meta(m, row);
    for (int t = 0; t < NT; ++t) {
      hv[r][t] = h[t * n + i + r];
      any |= hv[r][t] != 0.0f;
    }
  }
  return any;
}

#if MOEPACK_Q8_VEC == 64
// matmul_t (h @ W, a weighted sum of rows) for q4, and q2 with groups of a multiple of 64, on zmm.
// Per row and group, a 16-float table holds h_t * (q - z) * s for every code q (for q2, the four values
// repeated, so bits of the next code above the index are ignored), and vpermps looks the codes up in it:
// 16 bytes of codes widened to 16 int32 lanes give sub-vector k (the codes j*K + k) with one shift, as
// vpermps reads only the low 4 bits. The tile accumulates in that order (per 16*K columns: K vectors),
// four rows at a time, so it is loaded and stored once per four rows; the tile's end restores the column
// order. Each product is the reference's fp32 weight times h, so only the summation order differs.
template <int B, int NT, int NR>
inline void mt_rows_512(const moepack_cpu::QMat& m, const float* h, int64_t n, const int64_t* rows, int64_t i,
                        int64_t g0, int64_t g1, float* acc, int64_t ldacc) {
  constexpr int K = 8 / B, BLK = 16 * K;
  const uint8_t* cp[NR];
  const uint8_t* pf[NR];
  RowMeta ri[NR];
  float hv[NR][NT];
  if (!mt_row_setup<NT, NR>(m, h, n, rows, i, cp, pf, ri, hv)) return;
  const __m512 iota = B == 4 ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                             : _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  const int64_t c0 = g0 * m.group;
  for (int64_t g = g0; g < g1; ++g) {
    __m512 tbl[NR][NT];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      float s, z;
      ri[r].sz(g, s, z);
      const __m512 w = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) tbl[r][t] = _mm512_mul_ps(w, _mm512_set1_ps(hv[r][t]));
    }
    for (int64_t col = g * m.group; col < (g + 1) * m.group; col += BLK) {
      __m512 ac[NT][K];
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) ac[t][k] = _mm512_loadu_ps(acc + t * ldacc + (col - c0) + 16 * k);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        if ((col * B / 8) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(pf[r] + col * B / 8), _MM_HINT_T0);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp[r] + col * B / 8)));
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) {
          const __m512i idx = k == 0 ? v : _mm512_srli_epi32(v, B * k);
#pragma GCC unroll 4
          for (int t = 0; t < NT; ++t) ac[t][k] = _mm512_add_ps(ac[t][k], _mm512_permutexvar_ps(idx, tbl[r][t]));
        }
      }
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) _mm512_storeu_ps(acc + t * ldacc + (col - c0) + 16 * k, ac[t][k]);
    }
  }
}

template <int B, int NT>
void mt_tile_512(const moepack_cpu::QMat& m, const float* h, const int64_t* rows, int64_t n, int64_t g0, int64_t g1,
                 float* acc, int64_t ldacc) {
  constexpr int K = 8 / B, BLK = 16 * K;
  const int64_t width = (g1 - g0) * m.group;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) mt_rows_512<B, NT, 4>(m, h, n, rows, i, g0, g1, acc, ldacc);
  for (; i < n; ++i) mt_rows_512<B, NT, 1>(m, h, n, rows, i, g0, g1, acc, ldacc);
  float tmp[BLK];
  for (int t = 0; t < NT; ++t) {
    float* a = acc + t * ldacc;
    for (int64_t c = 0; c < width; c += BLK) {
      for (int j = 0; j < BLK; ++j) tmp[j] = a[c + j];
      for (int j = 0; j < 16; ++j)
        for (int k = 0; k < K; ++k) a[c + j * K + k] = tmp[k * 16 + j];
    }
  }
}

template <int B>
void mt_any_512(const moepack_cpu::QMat& m, const float* h, int64_t nt, const int64_t* rows, int64_t n, int64_t g0,
                int64_t g1, float* acc, int64_t ldacc) {
  for (int64_t t = 0; t < nt; t += 4) {  // more than 4 tokens: passes of at most 4
    const float* ht = h + t * n;
    float* at = acc + t * ldacc;
    switch (nt - t >= 4 ? 4 : nt - t) {
      case 4: mt_tile_512<B, 4>(m, ht, rows, n, g0, g1, at, ldacc); break;
      case 3: mt_tile_512<B, 3>(m, ht, rows, n, g0, g1, at, ldacc); break;
      case 2: mt_tile_512<B, 2>(m, ht, rows, n, g0, g1, at, ldacc); break;
      default: mt_tile_512<B, 1>(m, ht, rows, n, g0, g1, at, ldacc); break;
    }
  }
}

void mt_whole_groups(const moepack_cpu::QMat& m, const float* h, int64_t nt, const int64_t* rows, int64_t n,
                     int64_t g0, int64_t g1, float* acc, int64_t ldacc) {
  if (m.bits == 4)
    mt_any_512<4>(m, h, nt, rows, n, g0, g1, acc, ldacc);
  else if (m.bits == 2 && m.group % 64 == 0)
    mt_any_512<2>(m, h, nt, rows, n, g0, g1, acc, ldacc);
  else
    k_qmatmul_t(m, h, nt, rows, n, g0, g1, acc, ldacc);
}

#else  // 32-byte vectors
// matmul_t for q2/q4 on ymm (AVX2 has no 16-entry permute): acc[c] += sum_i (h_i s_ig) q_ic with the codes
// widened from 8 bytes to 8 int32 lanes (sub-vector k: the codes j*K + k, by shift and mask) and converted
// to float, four rows at a time; the zero-point term -sum_i h_i s_ig z_ig is summed per group (kz) and
// added, with the column order restored, at the tile's end.
template <int B, int NT, int NR>
inline void mt_rows_256(const moepack_cpu::QMat& m, const float* h, int64_t n, const int64_t* rows, int64_t i,
                        int64_t g0, int64_t g1, float* acc, int64_t ldacc, float* kz) {
  constexpr int K = 8 / B, BLK = 8 * K;
  const __m256i low = _mm256_set1_epi32((1 << B) - 1);
  const uint8_t* cp[NR];
  const uint8_t* pf[NR];
  RowMeta ri[NR];
  float hv[NR][NT];
  if (!mt_row_setup<NT, NR>(m, h, n, rows, i, cp, pf, ri, hv)) return;
  const int64_t c0 = g0 * m.group, tg = g1 - g0;
  for (int64_t g = g0; g < g1; ++g) {
    __m256 a[NR][NT];
    for (int r = 0; r < NR; ++r) {
      float s, z;
      ri[r].sz(g, s, z);
      for (int t = 0; t < NT; ++t) {
        const float hs = hv[r][t] * s;
        a[r][t] = _mm256_set1_ps(hs);
        kz[t * tg + (g - g0)] -= hs * z;
      }
    }
    for (int64_t col = g * m.group; col < (g + 1) * m.group; col += BLK) {
      __m256 ac[NT][K];
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) ac[t][k] = _mm256_loadu_ps(acc + t * ldacc + (col - c0) + 8 * k);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        if ((col * B / 8) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(pf[r] + col * B / 8), _MM_HINT_T0);
        const __m256i v =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp[r] + col * B / 8)));
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) {
          const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, B * k), low));
#pragma GCC unroll 4
          for (int t = 0; t < NT; ++t) ac[t][k] = _mm256_fmadd_ps(q, a[r][t], ac[t][k]);
        }
      }
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) _mm256_storeu_ps(acc + t * ldacc + (col - c0) + 8 * k, ac[t][k]);
    }
  }
}

template <int B, int NT>
void mt_tile_256(const moepack_cpu::QMat& m, const float* h, const int64_t* rows, int64_t n, int64_t g0, int64_t g1,
                 float* acc, int64_t ldacc) {
  constexpr int K = 8 / B, BLK = 8 * K;
  const int64_t tg = g1 - g0, width = tg * m.group;
  float kz[NT * 256];  // the glue's tiles hold at most 8192 / (T * 32) groups
  for (int64_t k = 0; k < NT * tg; ++k) kz[k] = 0.0f;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) mt_rows_256<B, NT, 4>(m, h, n, rows, i, g0, g1, acc, ldacc, kz);
  for (; i < n; ++i) mt_rows_256<B, NT, 1>(m, h, n, rows, i, g0, g1, acc, ldacc, kz);
  float tmp[BLK];
  for (int t = 0; t < NT; ++t) {
    float* a = acc + t * ldacc;
    for (int64_t c = 0; c < width; c += BLK) {
      for (int j = 0; j < BLK; ++j) tmp[j] = a[c + j];
      const float z = kz[t * tg + c / m.group];
      for (int j = 0; j < 8; ++j)
        for (int k = 0; k < K; ++k) a[c + j * K + k] = tmp[k * 8 + j] + z;
    }
  }
}

template <int B>
void mt_any_256(const moepack_cpu::QMat& m, const float* h, int64_t nt, const int64_t* rows, int64_t n, int64_t g0,
                int64_t g1, float* acc, int64_t ldacc) {
  for (int64_t t = 0; t < nt; t += 4) {  // more than 4 tokens: passes of at most 4
    const float* ht = h + t * n;
    float* at = acc + t * ldacc;
    switch (nt - t >= 4 ? 4 : nt - t) {
      case 4: mt_tile_256<B, 4>(m, ht, rows, n, g0, g1, at, ldacc); break;
      case 3: mt_tile_256<B, 3>(m, ht, rows, n, g0, g1, at, ldacc); break;
      case 2: mt_tile_256<B, 2>(m, ht, rows, n, g0, g1, at, ldacc); break;
      default: mt_tile_256<B, 1>(m, ht, rows, n, g0, g1, at, ldacc); break;
    }
  }
}

void mt_whole_groups(const moepack_cpu::QMat& m, const float* h, int64_t nt, const int64_t* rows, int64_t n,
                     int64_t g0, int64_t g1, float* acc, int64_t ldacc) {
  const int64_t passes_t = nt < 4 ? nt : 4;
  if ((m.bits == 4 || m.bits == 2) && (g1 - g0) * passes_t <= 256)
    m.bits == 4 ? mt_any_256<4>(m, h, nt, rows, n, g0, g1, acc, ldacc)
                : mt_any_256<2>(m, h, nt, rows, n, g0, g1, acc, ldacc);
  else
    k_qmatmul_t(m, h, nt, rows, n, g0, g1, acc, ldacc);
}
#endif

// The vector kernels above read whole groups of codes; a ragged last group (cols % group != 0) goes
// through the LUT kernel, which decodes the row's partial last block from a copy.
void k_qmatmul_t_fast(const moepack_cpu::QMat& m, const float* h, int64_t nt, const int64_t* rows, int64_t n,
                      int64_t g0, int64_t g1, float* acc, int64_t ldacc) {
  const int64_t whole = m.cols / m.group, gm = g1 < whole ? g1 : (g0 > whole ? g0 : whole);
  if (gm > g0) mt_whole_groups(m, h, nt, rows, n, g0, gm, acc, ldacc);
  if (g1 > gm) k_qmatmul_t(m, h, nt, rows, n, gm, g1, acc + (gm - g0) * m.group, ldacc);
}

}  // namespace
