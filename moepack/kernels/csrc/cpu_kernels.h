// The fp32 kernels (exact: weights decoded bit-identically to the codec reference, only the fp32
// accumulation order differs), written once and compiled by each isa_*.cpp under its target pragma.
//
// The including file defines MOEPACK_SIMD (1: AVX2/FMA/F16C intrinsics may be used, 0: plain C++) and
// includes <immintrin.h> when it is 1. Everything lives in an anonymous namespace and uses no standard
// library template, so nothing compiled here can be merged with another ISA's copy (cpu_table.h).
//
// Every group holds a multiple of 32 codes, and 32 codes of b bits are exactly 4*b bytes, so the inner
// unit is one "block" of 32 codes decoded into four vectors of 8 floats through a per-group lookup table
// of the 2^b possible weights ((q - zero) * scale, the reference's fp32 rounding). bf16/fp16 matrices
// use the same kernels, a block of 32 weights widened to fp32 on the fly (exact). Both formats are a
// `Rows` type with one method, blocks(r, g0, g1, f), calling f(col, w[4]) for each 32-column block of
// row r in units [g0, g1) (a unit is a quantisation group, or 32 columns of a 16-bit row).
//
// Ragged rows (format version 2): a quantised row of any length has ceil(cols/G) groups and
// ceil(cols*b/8) bytes, so its last group may hold fewer than G codes and its last block fewer than 32.
// That block is decoded from a zero-filled copy (nothing past the row is read) and handed on whole:
// its weights past `cols` are finite ((0 - zero) * scale), so callers pad x with zeros to cols32 =
// cols rounded up to 32 (the glue does), size their buffers to whole units, and store no more than
// `cols` values (dequant_rows).
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu_table.h"

namespace {

constexpr int64_t kMaxFusedTokens = 8;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

inline float fp16_to_float_scalar(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// --- an 8-float vector: AVX2 register or a plain array --------------------------------------------
#if MOEPACK_SIMD
struct V8 {
  __m256 v;
};
inline V8 v_zero() { return {_mm256_setzero_ps()}; }
inline V8 v_set1(float a) { return {_mm256_set1_ps(a)}; }
inline V8 v_load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void v_store(float* p, V8 a) { _mm256_storeu_ps(p, a.v); }
inline V8 v_fma(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline V8 v_add(V8 a, V8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline float v_hsum(V8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
inline V8 widen_bf16(const uint16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(u, 16))};
}
inline V8 widen_fp16(const uint16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
#else
struct V8 {
  float v[8];
};
inline V8 v_zero() { return V8{{0, 0, 0, 0, 0, 0, 0, 0}}; }
inline V8 v_set1(float a) { return V8{{a, a, a, a, a, a, a, a}}; }
inline V8 v_load(const float* p) {
  V8 r;
  memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline void v_store(float* p, V8 a) { memcpy(p, a.v, sizeof(a.v)); }
inline V8 v_fma(V8 a, V8 b, V8 c) {
  for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline V8 v_add(V8 a, V8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
  return a;
}
inline float v_hsum(V8 a) {
  float s = 0;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}
inline float half_to_float(uint16_t h) { return fp16_to_float_scalar(h); }
inline V8 widen_bf16(const uint16_t* p) {
  V8 r;
  for (int i = 0; i < 8; ++i) {
    const uint32_t bits = (uint32_t)p[i] << 16;
    memcpy(&r.v[i], &bits, 4);
  }
  return r;
}
inline V8 widen_fp16(const uint16_t* p) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = half_to_float(p[i]);
  return r;
}
#endif

// The group metadata of one row: sz(g, s, z) gives group g's scale and zero as the reference computes
// them: fp16 values (gq), or 8-bit codes under the row's fp16 factors (gqd, read once per row here),
// whose products are exact in fp32, so a fused multiply-add rounds as the reference's multiply-then-add.
struct RowMeta {
  const uint16_t* sc;
  const uint16_t* ze;
  const uint8_t* sq;  // nullptr: fp16 metadata
  const uint8_t* zq;
  float ds, z0, dz;
  inline void sz(int64_t g, float& s, float& z) const {
    if (sq == nullptr) {
      s = half_to_float(sc[g]);
      z = half_to_float(ze[g]);
      return;
    }
    s = ds * (float)sq[g];
    z = z0 + dz * (float)zq[g];
  }
};

inline RowMeta row_meta(const moepack_cpu::QMat& m, int64_t row) {
  const int64_t k = row * m.groups;
  if (m.rowq == nullptr) return RowMeta{m.scale + k, m.zero + k, nullptr, nullptr, 0.0f, 0.0f, 0.0f};
  const uint16_t* f = m.rowq + row * 3;
  return RowMeta{nullptr, nullptr, m.gscale + k, m.gzero + k, half_to_float(f[0]), half_to_float(f[1]),
                 half_to_float(f[2])};
}

// --- decoding one block of 32 codes ------------------------------------------------------------------
// Group<B>(scale, zero) builds the group's table; decode(p, w) reads the 4*B bytes at p into w[0..3].
#if MOEPACK_SIMD
template <int B>
struct Group;

template <>
struct Group<4> {
  __m256 lo, hi;  // weights of codes 0..7 and 8..15
  Group(float s, float z) {
    const __m256 zs = _mm256_set1_ps(z), ss = _mm256_set1_ps(s);
    lo = _mm256_mul_ps(_mm256_sub_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), zs), ss);
    hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), zs), ss);
  }
  inline void decode(const uint8_t* p, V8* w) const {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (int j = 0; j < 4; ++j) {
      // lane i holds the word shifted so that code i sits in its low bits; permutevar reads the low
      // 3 bits as the index, and bit 3 (moved to the sign bit) picks the upper half of the table.
      const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32((int)load_u32(p + 4 * j)), shifts);
      const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
      const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
      w[j].v = _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
  }
};

template <>
struct Group<2> {
  __m256 table;  // weights of codes 0..3, twice: an index's bit 2 belongs to the next code
  Group(float s, float z) {
    table = _mm256_mul_ps(_mm256_sub_ps(_mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3), _mm256_set1_ps(z)),
                          _mm256_set1_ps(s));
  }
  inline void decode(const uint8_t* p, V8* w) const {
    const __m256i shifts_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i shifts_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    for (int j = 0; j < 2; ++j) {
      const __m256i word = _mm256_set1_epi32((int)load_u32(p + 4 * j));  // 16 codes
      w[2 * j].v = _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(word, shifts_lo));
      w[2 * j + 1].v = _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(word, shifts_hi));
    }
  }
};

template <>
struct Group<3> {
  __m256 table;
  Group(float s, float z) {
    table = _mm256_mul_ps(_mm256_sub_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(z)),
                          _mm256_set1_ps(s));
  }
  inline void decode(const uint8_t* p, V8* w) const {
    // 12 bytes = three words; 8 codes = 24 bits straddle the word boundaries.
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    const uint32_t a = load_u32(p), b = load_u32(p + 4), c = load_u32(p + 8);
    const uint32_t chunk[4] = {a, (a >> 24) | (b << 8), (b >> 16) | (c << 16), c >> 8};
    for (int j = 0; j < 4; ++j) {
      const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32((int)chunk[j]), shifts);
      w[j].v = _mm256_permutevar8x32_ps(table, idx);  // only the low 3 bits index
    }
  }
};
#else
template <int B>
struct Group {
  float table[1 << B];
  Group(float s, float z) {
    for (int q = 0; q < (1 << B); ++q) table[q] = ((float)q - z) * s;
  }
  inline void decode(const uint8_t* p, V8* w) const {
    for (int i = 0; i < 32; ++i) {
      const int bit = i * B;
      const uint32_t two = (uint32_t)p[bit >> 3] | ((bit + B - 1) >> 3 != (bit >> 3) ? (uint32_t)p[(bit >> 3) + 1] << 8 : 0u);
      w[i >> 3].v[i & 7] = table[(two >> (bit & 7)) & ((1u << B) - 1)];
    }
  }
};
#endif

// --- the two row formats ---------------------------------------------------------------------------
template <int B>
struct QuantRows {
  moepack_cpu::QMat q;
  const uint8_t* codes;
  int64_t row_bytes, groups, group, cols;
  static constexpr int64_t kMaxUnit = 128;  // groups up to this wide take the four-row matmul_t
  explicit QuantRows(const moepack_cpu::QMat& m)
      : q(m), codes(m.codes), row_bytes(m.row_bytes), groups(m.groups), group(m.group), cols(m.cols) {}
  // columns of unit g that blocks() visits: G, or for a ragged last group its length rounded up to 32
  inline int64_t unit_width(int64_t g) const { return imin(group, ((cols + 31) & ~(int64_t)31) - g * group); }
  template <class F>
  inline void blocks(int64_t r, int64_t g0, int64_t g1, F&& f) const {
    const uint8_t* c = codes + r * row_bytes;
    const RowMeta meta = row_meta(q, r);
    for (int64_t g = g0; g < g1; ++g) {
      float s, z;
      meta.sz(g, s, z);
      const Group<B> grp(s, z);
      const int64_t end = imin((g + 1) * group, cols);
      int64_t col = g * group;
      for (; col + 32 <= end; col += 32) {
        V8 w[4];
        grp.decode(c + col * B / 8, w);
        f(col, w);
      }
      if (col < end) {  // the row's last, partial block: decoded from a zero-filled copy of its bytes
        uint8_t buf[4 * B];
        memset(buf, 0, sizeof(buf));
        memcpy(buf, c + col * B / 8, (size_t)(row_bytes - col * B / 8));
        V8 w[4];
        grp.decode(buf, w);
        f(col, w);
      }
    }
  }
};

template <bool BF>
struct WideRows {
  const uint16_t* data;
  int64_t ld, groups, cols;
  static constexpr int64_t group = 32, kMaxUnit = 32;
  explicit WideRows(const moepack_cpu::WMat& m) : data(m.data), ld(m.ld), groups(m.groups), cols(m.cols) {}
  inline int64_t unit_width(int64_t) const { return 32; }
  template <class F>
  inline void blocks(int64_t r, int64_t g0, int64_t g1, F&& f) const {
    const uint16_t* p = data + r * ld;
    for (int64_t col = g0 * 32; col < g1 * 32; col += 32) {
      V8 w[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) w[j] = BF ? widen_bf16(p + col + 8 * j) : widen_fp16(p + col + 8 * j);
      f(col, w);
    }
  }
};

inline int64_t row_of(const int64_t* rows, int64_t i) { return rows ? rows[i] : i; }

// out[t, i] = sum_c x[t, c] * W[rows[i], c] for NT tokens, rows i in [i0, i1).
template <int NT, class M>
void matmul_rows(const M& m, const float* x, int64_t ldx, const int64_t* rows, int64_t i0, int64_t i1, float* out,
                 int64_t ldo) {
  constexpr int A = NT == 1 ? 4 : (NT == 2 ? 2 : 1);  // independent accumulators per token
  for (int64_t i = i0; i < i1; ++i) {
    V8 acc[NT][A];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) acc[t][a] = v_zero();
    m.blocks(row_of(rows, i), 0, m.groups, [&](int64_t col, const V8* w) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) acc[t][j % A] = v_fma(w[j], v_load(x + t * ldx + col + 8 * j), acc[t][j % A]);
    });
    for (int t = 0; t < NT; ++t) {
      V8 s = acc[t][0];
      for (int a = 1; a < A; ++a) s = v_add(s, acc[t][a]);
      out[t * ldo + i] = v_hsum(s);
    }
  }
}

template <class M>
void matmul_any(const M& m, const float* x, int64_t ldx, int nt, const int64_t* rows, int64_t i0, int64_t i1,
                float* out, int64_t ldo) {
  switch (nt) {
    case 4: matmul_rows<4>(m, x, ldx, rows, i0, i1, out, ldo); break;
    case 3: matmul_rows<3>(m, x, ldx, rows, i0, i1, out, ldo); break;
    case 2: matmul_rows<2>(m, x, ldx, rows, i0, i1, out, ldo); break;
    default: matmul_rows<1>(m, x, ldx, rows, i0, i1, out, ldo); break;
  }
}

// acc[t, c - c0] += sum_i h[t, i] * W[rows[i], c] over the units [g0, g1). Rows go four at a time: the
// accumulator tile (in L1) is loaded and stored once per four rows, which keeps the weighted row sum
// as fast as the dot products of matmul.
template <int NR, class M>
inline void matmul_t_rows(const M& m, const float* h, int64_t T, const int64_t* rows, int64_t n, int64_t i,
                          int64_t g0, int64_t g1, float* acc, int64_t ldacc) {
  const int64_t c0 = g0 * m.group;
  V8 hv[NR][kMaxFusedTokens];
  bool any = false;
  for (int r = 0; r < NR; ++r)
    for (int64_t t = 0; t < T; ++t) {
      const float v = h[t * n + i + r];
      any |= v != 0.0f;
      hv[r][t] = v_set1(v);
    }
  if (!any) return;  // exactly-zero activations add nothing
  if (NR == 1) {
    m.blocks(row_of(rows, i), g0, g1, [&](int64_t col, const V8* w) {
      for (int64_t t = 0; t < T; ++t) {
        float* a = acc + t * ldacc + (col - c0);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) v_store(a + 8 * j, v_fma(w[j], hv[0][t], v_load(a + 8 * j)));
      }
    });
    return;
  }
  for (int64_t g = g0; g < g1; ++g) {  // one unit of NR rows at a time, decoded into a small buffer
    V8 w[NR][M::kMaxUnit / 8];
    for (int r = 0; r < NR; ++r) {
      m.blocks(row_of(rows, i + r), g, g + 1, [&](int64_t col, const V8* b) {
        const int64_t k = (col - g * m.group) / 8;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) w[r][k + j] = b[j];
      });
    }
    const int64_t kend = m.unit_width(g) / 8;  // a ragged last group fills only part of w
    for (int64_t t = 0; t < T; ++t) {
      float* a = acc + t * ldacc + (g * m.group - c0);
      for (int64_t k = 0; k < kend; ++k) {
        V8 s = v_load(a + 8 * k);
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) s = v_fma(w[r][k], hv[r][t], s);
        v_store(a + 8 * k, s);
      }
    }
  }
}

template <class M>
void matmul_t_tile(const M& m, const float* h, int64_t T, const int64_t* rows, int64_t n, int64_t g0, int64_t g1,
                   float* acc, int64_t ldacc) {
  int64_t i = 0;
  if (m.group <= M::kMaxUnit)
    for (; i + 4 <= n; i += 4) matmul_t_rows<4>(m, h, T, rows, n, i, g0, g1, acc, ldacc);
  for (; i < n; ++i) matmul_t_rows<1>(m, h, T, rows, n, i, g0, g1, acc, ldacc);
}

// 8 floats -> 8 bf16, round to nearest even (weights are finite, so no NaN handling is needed).
#if MOEPACK_SIMD
inline void store_bf16(uint16_t* p, V8 a) {
  __m256i b = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#else
inline void store_bf16(uint16_t* p, V8 a) {
  for (int i = 0; i < 8; ++i) {
    uint32_t bits;
    memcpy(&bits, &a.v[i], 4);
    p[i] = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}
#endif

inline void store_out(float* p, V8 a) { v_store(p, a); }
inline void store_out(uint16_t* p, V8 a) { store_bf16(p, a); }

template <class M, class Out>
void dequant_rows(const M& m, const int64_t* rows, int64_t i0, int64_t i1, Out* out) {
  for (int64_t i = i0; i < i1; ++i) {
    Out* o = out + i * m.cols;
    m.blocks(row_of(rows, i), 0, m.groups, [&](int64_t col, const V8* w) {
      if (col + 32 <= m.cols) {
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) store_out(o + col + 8 * j, w[j]);
        return;
      }
      Out tmp[32];  // the row's partial last block: only its first cols - col values are stored
      for (int j = 0; j < 4; ++j) store_out(tmp + 8 * j, w[j]);
      for (int64_t j = 0; j < m.cols - col; ++j) o[col + j] = tmp[j];
    });
  }
}

// --- entry points with the bit width / dtype as a run-time value ------------------------------------
template <class F>
inline void with_bits(const moepack_cpu::QMat& m, F&& f) {
  if (m.bits == 2)
    f(QuantRows<2>(m));
  else if (m.bits == 3)
    f(QuantRows<3>(m));
  else
    f(QuantRows<4>(m));
}

template <class F>
inline void with_wide(const moepack_cpu::WMat& m, F&& f) {
  if (m.bf16)
    f(WideRows<true>(m));
  else
    f(WideRows<false>(m));
}

void k_qmatmul(const moepack_cpu::QMat& m, const float* x, int64_t ldx, int nt, const int64_t* rows, int64_t i0,
               int64_t i1, float* out, int64_t ldo) {
  with_bits(m, [&](const auto& q) { matmul_any(q, x, ldx, nt, rows, i0, i1, out, ldo); });
}
void k_pmatmul(const moepack_cpu::WMat& m, const float* x, int64_t ldx, int nt, const int64_t* rows, int64_t i0,
               int64_t i1, float* out, int64_t ldo) {
  with_wide(m, [&](const auto& w) { matmul_any(w, x, ldx, nt, rows, i0, i1, out, ldo); });
}
void k_qmatmul_t(const moepack_cpu::QMat& m, const float* h, int64_t nt, const int64_t* rows, int64_t n, int64_t g0,
                 int64_t g1, float* acc, int64_t ldacc) {
  with_bits(m, [&](const auto& q) { matmul_t_tile(q, h, nt, rows, n, g0, g1, acc, ldacc); });
}
void k_pmatmul_t(const moepack_cpu::WMat& m, const float* h, int64_t nt, const int64_t* rows, int64_t n, int64_t g0,
                 int64_t g1, float* acc, int64_t ldacc) {
  with_wide(m, [&](const auto& w) { matmul_t_tile(w, h, nt, rows, n, g0, g1, acc, ldacc); });
}
void k_qdequant(const moepack_cpu::QMat& m, const int64_t* rows, int64_t i0, int64_t i1, float* out) {
  with_bits(m, [&](const auto& q) { dequant_rows(q, rows, i0, i1, out); });
}
void k_qdequant_bf16(const moepack_cpu::QMat& m, const int64_t* rows, int64_t i0, int64_t i1, uint16_t* out) {
  with_bits(m, [&](const auto& q) { dequant_rows(q, rows, i0, i1, out); });
}

}  // namespace
