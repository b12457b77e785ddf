// The integer GEMV: group-quantised weights (2 and 4 bits) times int8 activations, as llama.cpp's q8
// activations. Compiled by the x86 isa_*.cpp files; MOEPACK_Q8_VEC (64 or 32) picks zmm or ymm code and
// MOEPACK_VNNI (1/0) vpdpbusd or the AVX2 pair vpmaddubsw + vpmaddwd (exact here: |q| <= 15, |xq| <= 127).
//
// A "chunk" is one vector of packed codes (64 or 32 bytes, 8/B codes per byte). Splitting every byte into
// its 8/B codes gives K = 8/B vectors of one code per byte; q8_prepare (dequant_cpu.cpp) stores each
// token's int8 activations in that order, so sub-vector k pairs with activations of codes j*K + k. A
// 32-bit lane of a chunk then covers 32/B consecutive codes, all in one block of 32 activations (scale
// d) and one quantisation group (scale s, zero z), so per chunk and token:
//   acc += float(sum over the lane of q * xq) * d[lane] * s[lane]
// and per row, out = sum(acc) - sum_g s_g z_g c_g with c_g = sum over the group of xq * d: the codes
// stay integers until a chunk is summed, and the zero point costs one dot product of length groups.
// With two planes (P = 2, the default), a second int8 plane holds the rounding residual times 128, so
// the activations carry about 15 bits (d/128 steps) and the lane sum 128 * hi + lo is still exact.
#pragma once
#include <cstdint>

#include "cpu_table.h"

namespace {

#if MOEPACK_Q8_VEC == 64
inline __m512i q8_dot(__m512i acc, __m512i u, __m512i s) {
#if MOEPACK_VNNI
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

// R rows at once (they share the loads of the activations) with two accumulators per row and token
// (even and odd chunks), so neither the FMA chain nor the per-row setup limits the stream of codes.
template <int B, int NT, int P, int R>
inline void q8_block(const moepack_cpu::QMat& m, const moepack_cpu::Q8X& a, const int64_t* rows, int64_t i,
                     int64_t i_end, float* out, int64_t ldo, float* sf_all) {
  constexpr int K = 8 / B;
  const __m512i mask = _mm512_set1_epi8((char)((1 << B) - 1));
  const int64_t full = m.row_bytes / 64, chunks = a.chunks, sfs = m.groups + 32;
  const __mmask64 tail = (__mmask64)((1ULL << (m.row_bytes - full * 64)) - 1);  // unused when none
  const int64_t xs = chunks * a.chunk_codes, ds = chunks * 16;
  const uint8_t* cp[R];
  const uint8_t* pf[R];  // the same place in the next block's rows: prefetched, as the hardware prefetcher
                         // restarts at every 4 KiB page
  float* sf[R];
  __m512 acc[R][NT][2];
  for (int r = 0; r < R; ++r) {
    const int64_t row = rows ? rows[i + r] : i + r;
    cp[r] = m.codes + row * m.row_bytes;
    const int64_t next = i + R + r < i_end ? (rows ? rows[i + R + r] : i + R + r) : row;
    pf[r] = m.codes + next * m.row_bytes;
    sf[r] = sf_all + r * sfs;
    for (int t = 0; t < NT; ++t) acc[r][t][0] = acc[r][t][1] = _mm512_setzero_ps();
    const RowMeta meta = row_meta(m, row);
    for (int64_t g = 0; g < m.groups; g += 16) {  // the scales as floats; the zero-point term, subtracted
      const int64_t left = m.groups - g;
      const __mmask16 k = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
      __m512 s, sz;
      if (meta.sq == nullptr) {
        s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, meta.sc + g));
        sz = _mm512_mul_ps(s, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, meta.ze + g)));
      } else {  // double-quantised: s = d_s * gscale, z = z_0 + d_z * gzero
        const __m512 sq = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, meta.sq + g)));
        const __m512 zq = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, meta.zq + g)));
        s = _mm512_mul_ps(_mm512_set1_ps(meta.ds), sq);
        sz = _mm512_mul_ps(s, _mm512_fmadd_ps(_mm512_set1_ps(meta.dz), zq, _mm512_set1_ps(meta.z0)));
      }
      _mm512_storeu_ps(sf[r] + g, s);
      for (int t = 0; t < NT; ++t)
        acc[r][t][1] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(k, a.c + t * m.groups + g), acc[r][t][1]);
    }
  }
  const bool uniform = m.group % a.chunk_codes == 0;
  auto step = [&](int64_t ch, int par) __attribute__((always_inline)) {
    __m512 sv[R];
    __m512i sub[R][K];
    const int32_t g0 = a.gfirst[ch];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(pf[r] + ch * 64), _MM_HINT_T0);
      const __m512i bytes =
          ch < full ? _mm512_loadu_si512(cp[r] + ch * 64) : _mm512_maskz_loadu_epi8(tail, cp[r] + ch * 64);
      sv[r] = uniform ? _mm512_set1_ps(sf[r][g0])  // the chunk lies in one group
                      : _mm512_permutexvar_ps(_mm512_loadu_si512(a.gidx + ch * 16), _mm512_loadu_ps(sf[r] + g0));
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) sub[r][k] = _mm512_and_si512(_mm512_srli_epi16(bytes, B * k), mask);
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const int8_t* xq = a.q + t * xs + ch * a.chunk_codes;
      const __m512 d = _mm512_loadu_ps(a.d + t * ds + ch * 16);
      __m512i xv[P][K];
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) xv[p][k] = _mm512_loadu_si512(xq + p * a.plane + 64 * k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m512i ai = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) ai = q8_dot(ai, sub[r][k], xv[0][k]);
        if (P == 2) {  // the residual plane: ai = 128 * hi + lo, exact in int32
          __m512i lo = _mm512_setzero_si512();
#pragma GCC unroll 4
          for (int k = 0; k < K; ++k) lo = q8_dot(lo, sub[r][k], xv[P - 1][k]);
          ai = _mm512_add_epi32(_mm512_slli_epi32(ai, 7), lo);
        }
        acc[r][t][par] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ai), d), sv[r], acc[r][t][par]);
      }
    }
  };
  int64_t ch = 0;
  for (; ch + 2 <= chunks; ch += 2) {
    step(ch, 0);
    step(ch + 1, 1);
  }
  if (ch < chunks) step(ch, 0);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) out[t * ldo + i + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]));
}

template <int B, int NT, int P>
void q8_rows(const moepack_cpu::QMat& m, const moepack_cpu::Q8X& a, const int64_t* rows, int64_t i0, int64_t i1,
             float* out, int64_t ldo, float* sf) {
  constexpr int R = NT == 1 ? 4 : (NT == 2 ? 2 : 1);
  int64_t i = i0;
  for (; i + R <= i1; i += R) q8_block<B, NT, P, R>(m, a, rows, i, i1, out, ldo, sf);
  for (; i < i1; ++i) q8_block<B, NT, P, 1>(m, a, rows, i, i1, out, ldo, sf);
}

#else  // 32-byte vectors
inline __m256i q8_dot(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

inline float q8_hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// As the zmm code: R rows share the activation loads, two accumulators per row and token.
template <int B, int NT, int P, int R>
inline void q8_block(const moepack_cpu::QMat& m, const moepack_cpu::Q8X& a, const int64_t* rows, int64_t i,
                     int64_t i_end, float* out, int64_t ldo, float* sf_all) {
  constexpr int K = 8 / B;
  const __m256i mask = _mm256_set1_epi8((char)((1 << B) - 1));
  const int64_t full = m.row_bytes / 32, chunks = a.chunks, tail = m.row_bytes - full * 32, sfs = m.groups + 32;
  const int64_t xs = chunks * a.chunk_codes, ds = chunks * 8;
  const uint8_t* cp[R];
  const uint8_t* pf[R];  // the same place in the next block's rows (see the zmm code)
  float* sf[R];
  __m256 acc[R][NT][2];
  float zsum[R][NT];
  for (int r = 0; r < R; ++r) {
    const int64_t row = rows ? rows[i + r] : i + r;
    cp[r] = m.codes + row * m.row_bytes;
    const int64_t next = i + R + r < i_end ? (rows ? rows[i + R + r] : i + R + r) : row;
    pf[r] = m.codes + next * m.row_bytes;
    sf[r] = sf_all + r * sfs;
    const RowMeta meta = row_meta(m, row);
    for (int t = 0; t < NT; ++t) {
      acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();
      zsum[r][t] = 0.0f;
    }
    int64_t g = 0;
    for (; g + 8 <= m.groups; g += 8) {  // 8 groups at a time
      __m256 s, sz;
      if (meta.sq == nullptr) {
        s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(meta.sc + g)));
        sz = _mm256_mul_ps(s, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(meta.ze + g))));
      } else {  // double-quantised: s = d_s * gscale, z = z_0 + d_z * gzero
        const __m256 sq = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta.sq + g))));
        const __m256 zq = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta.zq + g))));
        s = _mm256_mul_ps(_mm256_set1_ps(meta.ds), sq);
        sz = _mm256_mul_ps(s, _mm256_fmadd_ps(_mm256_set1_ps(meta.dz), zq, _mm256_set1_ps(meta.z0)));
      }
      _mm256_storeu_ps(sf[r] + g, s);
      for (int t = 0; t < NT; ++t)
        acc[r][t][1] = _mm256_fnmadd_ps(sz, _mm256_loadu_ps(a.c + t * m.groups + g), acc[r][t][1]);
    }
    for (; g < m.groups; ++g) {
      float s, z;
      meta.sz(g, s, z);
      sf[r][g] = s;
      for (int t = 0; t < NT; ++t) zsum[r][t] += s * z * a.c[t * m.groups + g];
    }
  }
  const bool uniform = m.group % a.chunk_codes == 0;
  auto step = [&](int64_t ch, int par) __attribute__((always_inline)) {
    __m256 sv[R];
    __m256i sub[R][K];
    const int32_t g0 = a.gfirst[ch];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      __m256i bytes;
      if ((ch & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(pf[r] + ch * 32), _MM_HINT_T0);
      if (ch < full) {
        bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp[r] + ch * 32));
      } else {
        alignas(32) uint8_t buf[32] = {0};
        memcpy(buf, cp[r] + ch * 32, (size_t)tail);
        bytes = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
      }
      sv[r] = uniform ? _mm256_set1_ps(sf[r][g0])
                      : _mm256_permutevar8x32_ps(_mm256_loadu_ps(sf[r] + g0),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.gidx + ch * 8)));
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) sub[r][k] = _mm256_and_si256(_mm256_srli_epi16(bytes, B * k), mask);
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const int8_t* xq = a.q + t * xs + ch * a.chunk_codes;
      const __m256 d = _mm256_loadu_ps(a.d + t * ds + ch * 8);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        __m256i ai = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k)
          ai = q8_dot(ai, sub[r][k], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * k)));
        if (P == 2) {  // the residual plane: ai = 128 * hi + lo, exact in int32
          __m256i lo = _mm256_setzero_si256();
#pragma GCC unroll 4
          for (int k = 0; k < K; ++k)
            lo = q8_dot(lo, sub[r][k], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + a.plane + 32 * k)));
          ai = _mm256_add_epi32(_mm256_slli_epi32(ai, 7), lo);
        }
        acc[r][t][par] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(ai), d), sv[r], acc[r][t][par]);
      }
    }
  };
  int64_t ch = 0;
  for (; ch + 2 <= chunks; ch += 2) {
    step(ch, 0);
    step(ch + 1, 1);
  }
  if (ch < chunks) step(ch, 0);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t)
      out[t * ldo + i + r] = q8_hsum(_mm256_add_ps(acc[r][t][0], acc[r][t][1])) - zsum[r][t];
}

template <int B, int NT, int P>
void q8_rows(const moepack_cpu::QMat& m, const moepack_cpu::Q8X& a, const int64_t* rows, int64_t i0, int64_t i1,
             float* out, int64_t ldo, float* sf) {
  constexpr int R = NT == 1 ? 2 : 1;  // 16 ymm registers
  int64_t i = i0;
  for (; i + R <= i1; i += R) q8_block<B, NT, P, R>(m, a, rows, i, i1, out, ldo, sf);
  for (; i < i1; ++i) q8_block<B, NT, P, 1>(m, a, rows, i, i1, out, ldo, sf);
}

#endif


// --- the activations, prepared once per call (AVX2 code, so every x86 table shares it) --------------
inline float q8_hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t q8_hsum_i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// four vectors of 8 int32 (each in [-127, 127]) -> 32 int8 in order
inline void q8_pack(uint8_t* dst, const __m256i* v) {
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// Fills a (its buffers sized by the glue): per token and block of 32 values d = amax / 127 and
// xq = round(x / d) (the residual round((x / d - xq) * 128) as a second plane when a.plane != 0), the
// codes' order within each chunk, each lane's block scale (d, or d / 128 with two planes) and group,
// and c_g = sum over the group of the dequantised activations. A row whose length is not a multiple of
// 32 is handled as cols32 = cols rounded up to 32: x is zero past cols (the glue pads it), so those
// activations quantise to 0 and add nothing. scratch: 2 * cols32 bytes.
void k_q8_prepare(const moepack_cpu::QMat& m, const float* x, int64_t ldx, int64_t T, moepack_cpu::Q8X& a,
                  int8_t* q, float* d, float* c, int32_t* gidx, int32_t* gfirst, uint8_t* scratch) {
  const int K = 8 / m.bits;
  const int64_t cc = a.chunk_codes, lanes = a.lanes, lc = 32 / m.bits, vec = cc / K;
  const int64_t cols32 = (m.cols + 31) & ~(int64_t)31;
  const int64_t xs = a.chunks * cc, ds = a.chunks * lanes, blocks = cols32 / 32;
  const bool two = a.plane != 0;
  int64_t g = 0, gnext = m.group;  // group of each lane, by counting (no division per lane)
  for (int64_t ch = 0; ch < a.chunks; ++ch) {
    const int64_t start0 = ch * cc;
    while (start0 >= gnext && start0 < m.cols) {
      ++g;
      gnext += m.group;
    }
    gfirst[ch] = (int32_t)g;
    int64_t gl = g, gn = gnext;
    for (int64_t l = 0; l < lanes; ++l) {
      const int64_t start = start0 + l * lc;
      while (start >= gn && start < m.cols) {
        ++gl;
        gn += m.group;
      }
      gidx[ch * lanes + l] = start < m.cols ? (int32_t)(gl - g) : 0;
    }
  }
  uint8_t* hi = scratch;
  uint8_t* lo = scratch + cols32;
  const __m256 sign = _mm256_set1_ps(-0.0f), k128 = _mm256_set1_ps(128.0f);
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * ldx;
    float* ct = c + t * m.groups;
    float* dt = d + t * ds;
    int8_t* qt = q + t * xs;
    for (int64_t gg = 0; gg < m.groups; ++gg) ct[gg] = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
      __m256 v[4];
      for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xt + 32 * b + 8 * j);
      const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                      _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      const float amax = q8_hmax(mx);
      const float db = amax / 127.0f;
      const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      __m256i qi[4], ri[4];
      __m256i sum = _mm256_setzero_si256(), sum_lo = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        const __m256 u = _mm256_mul_ps(v[j], id);
        qi[j] = _mm256_cvtps_epi32(u);  // nearest even; |u| <= 127
        sum = _mm256_add_epi32(sum, qi[j]);
        if (two) {
          ri[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(u, _mm256_cvtepi32_ps(qi[j])), k128));
          sum_lo = _mm256_add_epi32(sum_lo, ri[j]);
        }
      }
      q8_pack(hi + 32 * b, qi);
      if (two) q8_pack(lo + 32 * b, ri);
      const float scale = two ? db / 128.0f : db;
      const int32_t total = two ? 128 * q8_hsum_i(sum) + q8_hsum_i(sum_lo) : q8_hsum_i(sum);
      ct[32 * b / m.group] += scale * (float)total;
      const int64_t first = 32 * b / lc, count = 32 / lc;  // the lanes of this block (lanes run across chunks)
      for (int64_t l = first; l < first + count; ++l) dt[l] = scale;
    }
    const int64_t full = cols32 / cc;
    for (int p = 0; p < (two ? 2 : 1); ++p) {
      const uint8_t* src = p ? lo : hi;
      int8_t* dst = qt + p * a.plane;
      for (int64_t ch = 0; ch < a.chunks; ++ch) {
        const int64_t n = ch < full ? cc : cols32 - ch * cc;
        int8_t* o = dst + ch * cc;
        const uint8_t* in = src + ch * cc;
        if (n < cc)
          for (int64_t j = 0; j < cc; ++j) o[j] = 0;
        for (int64_t j = 0; j < n / K; ++j)
          for (int k = 0; k < K; ++k) o[k * vec + j] = (int8_t)in[j * K + k];
      }
    }
    for (int64_t l = blocks * 32 / lc; l < ds; ++l) dt[l] = 0.0f;
  }
}

template <int B>
void q8_any(const moepack_cpu::QMat& m, const moepack_cpu::Q8X& a, int nt, const int64_t* rows, int64_t i0,
            int64_t i1, float* out, int64_t ldo, float* sf) {
  if (a.plane == 0) {
    switch (nt) {
      case 4: q8_rows<B, 4, 1>(m, a, rows, i0, i1, out, ldo, sf); break;
      case 3: q8_rows<B, 3, 1>(m, a, rows, i0, i1, out, ldo, sf); break;
      case 2: q8_rows<B, 2, 1>(m, a, rows, i0, i1, out, ldo, sf); break;
      default: q8_rows<B, 1, 1>(m, a, rows, i0, i1, out, ldo, sf); break;
    }
    return;
  }
  switch (nt) {
    case 4: q8_rows<B, 4, 2>(m, a, rows, i0, i1, out, ldo, sf); break;
    case 3: q8_rows<B, 3, 2>(m, a, rows, i0, i1, out, ldo, sf); break;
    case 2: q8_rows<B, 2, 2>(m, a, rows, i0, i1, out, ldo, sf); break;
    default: q8_rows<B, 1, 2>(m, a, rows, i0, i1, out, ldo, sf); break;
  }
}

void k_q8_matmul(const moepack_cpu::QMat& m, const moepack_cpu::Q8X& a, int nt, const int64_t* rows, int64_t i0,
                 int64_t i1, float* out, int64_t ldo, float* sf) {
  if (m.bits == 2)
    q8_any<2>(m, a, nt, rows, i0, i1, out, ldo, sf);
  else
    q8_any<4>(m, a, nt, rows, i0, i1, out, ldo, sf);
}

}  // namespace
