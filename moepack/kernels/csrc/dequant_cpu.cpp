// Fused dequantise-and-multiply for moepack group quantisation (q2/q3/q4, group 32/64/128) on CPU.
//
// Payload (docs/architecture.md, "Codecs"): codes uint8 [rows, cols*b/8] (a little-endian bitstream per
// row), scale fp16 [rows, cols/G], zero fp16 [rows, cols/G]; w = (q - zero) * scale, computed in fp32.
//
// Every group holds a multiple of 32 codes, and 32 codes of b bits are exactly 4*b bytes, so the inner
// unit is one "block" of 32 codes decoded into four vectors of 8 floats. A block is decoded through a
// per-group lookup table of the 2^b possible weights ((q - zero) * scale, the same fp32 rounding as the
// torch reference), so decoded weights are bit-identical to the reference and only the order of the
// fp32 accumulation differs.
//
// The same kernels serve bf16/fp16 passthrough matrices W [rows, cols] (any row stride, unit column
// stride, cols a multiple of 32): a "block" of 32 weights is then widened to fp32 on the fly (exact), so
// a lossless pack never upcasts a whole matrix per call. Both formats are a `Rows` type with one method,
// `blocks(r, g0, g1, f)`, that calls f(col, w[4]) for each 32-column block of row r in units [g0, g1)
// (a unit is a quantisation group, or 32 columns of a passthrough row); the kernels are written once.
//
// Ops (registered with torch.library under the namespace moepack_cpu):
//   qmatmul(x[T,cols], ..., rows?)       -> [T, n]    = x @ W[rows].T   (row dot products)
//   qmatmul_t(h[T,n], ..., rows?, cols)  -> [T, cols] = h @ W[rows]     (weighted sum of rows)
//   qdequant(..., rows?, cols, bf16)     -> [n, cols] = W[rows] in fp32, or rounded to bf16 (nearest even)
//   pmatmul(x[T,cols], w, rows?)         -> [T, n]    (w bf16/fp16 [rows, cols])
//   pmatmul_t(h[T,n], w, rows?)          -> [T, cols]
// Token counts up to 8 run fused; the Python wrapper sends larger T through a dequantised (or widened)
// block of rows and a BLAS matmul.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MOEPACK_AVX2 1
#else
#define MOEPACK_AVX2 0
#endif

namespace {

constexpr int64_t kMaxFusedTokens = 8;

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// --- an 8-float vector: AVX2 register or a plain array --------------------------------------------
#if MOEPACK_AVX2
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
#else
struct V8 {
  float v[8];
};
inline V8 v_zero() { return V8{{0, 0, 0, 0, 0, 0, 0, 0}}; }
inline V8 v_set1(float a) { return V8{{a, a, a, a, a, a, a, a}}; }
inline V8 v_load(const float* p) {
  V8 r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline void v_store(float* p, V8 a) { std::memcpy(p, a.v, sizeof(a.v)); }
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
inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
#endif

// 8 consecutive bf16 / fp16 values widened to fp32 (both exact).
#if MOEPACK_AVX2
inline V8 widen_bf16(const uint16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(u, 16))};
}
inline V8 widen_fp16(const uint16_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
#else
inline V8 widen_bf16(const uint16_t* p) {
  V8 r;
  for (int i = 0; i < 8; ++i) {
    const uint32_t bits = (uint32_t)p[i] << 16;
    std::memcpy(&r.v[i], &bits, 4);
  }
  return r;
}
inline V8 widen_fp16(const uint16_t* p) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = half_to_float(p[i]);
  return r;
}
#endif

// --- decoding one block of 32 codes ------------------------------------------------------------------
// Group<B>(scale, zero) builds the group's table; decode(p, w) reads the 4*B bytes at p into w[0..3].
#if MOEPACK_AVX2
template <int B>
struct Group;

template <>
struct Group<4> {
  __m256 lo, hi;  // weights of codes 0..7 and 8..15
  __m256i shifts;
  Group(float s, float z) {
    const __m256 zs = _mm256_set1_ps(z), ss = _mm256_set1_ps(s);
    lo = _mm256_mul_ps(_mm256_sub_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), zs), ss);
    hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), zs), ss);
    shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  }
  inline void decode(const uint8_t* p, V8* w) const {
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
  __m256i shifts_lo, shifts_hi;
  Group(float s, float z) {
    table = _mm256_mul_ps(_mm256_sub_ps(_mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3), _mm256_set1_ps(z)),
                          _mm256_set1_ps(s));
    shifts_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    shifts_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  }
  inline void decode(const uint8_t* p, V8* w) const {
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
  __m256i shifts;
  Group(float s, float z) {
    table = _mm256_mul_ps(_mm256_sub_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(z)),
                          _mm256_set1_ps(s));
    shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  }
  inline void decode(const uint8_t* p, V8* w) const {
    // 12 bytes = three words; 8 codes = 24 bits straddle the word boundaries.
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
// A quantised matrix: units are groups.
template <int B>
struct QuantRows {
  const uint8_t* codes;
  const uint16_t* scale;
  const uint16_t* zero;
  int64_t row_bytes, groups, group, cols;
  template <class F>
  inline void blocks(int64_t r, int64_t g0, int64_t g1, F&& f) const {
    const uint8_t* c = codes + r * row_bytes;
    const uint16_t* sc = scale + r * groups;
    const uint16_t* ze = zero + r * groups;
    for (int64_t g = g0; g < g1; ++g) {
      const Group<B> grp(half_to_float(sc[g]), half_to_float(ze[g]));
      for (int64_t col = g * group; col < (g + 1) * group; col += 32) {
        V8 w[4];
        grp.decode(c + col * B / 8, w);
        f(col, w);
      }
    }
  }
};

// A bf16 (BF = true) or fp16 matrix with row stride `ld` elements: units are 32 columns.
template <bool BF>
struct WideRows {
  const uint16_t* data;
  int64_t ld, groups, cols;
  static constexpr int64_t group = 32;
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

// out[t, i] = sum_c x[t, c] * W[rows[i], c] for NT tokens starting at x (row stride ldx); the block
// callback is inlined, so the accumulators stay in registers.
template <int NT, class M>
void matmul_block(const M& m, const float* x, int64_t ldx, const int64_t* rows, int64_t n, float* out,
                  int64_t ldo) {
  constexpr int A = NT == 1 ? 4 : (NT == 2 ? 2 : 1);  // independent accumulators per token
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
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
  });
}

// out[t, c] = sum_i h[t, i] * W[rows[i], c] for all T <= kMaxFusedTokens tokens, parallel over column
// tiles: each tile accumulates in its own buffer (at most 32 KiB, so it stays in L1), so threads never
// share an output, and a tile is as wide as that allows so each row is read in as few pieces as possible.
template <class M>
void matmul_t_tiles(const M& m, const float* h, int64_t T, const int64_t* rows, int64_t n, float* out) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_cache = std::max<int64_t>(1, (8192 / T) / m.group);          // units per tile
  const int64_t by_threads = std::max<int64_t>(1, (m.groups + threads - 1) / threads);
  const int64_t tile_groups = std::min(by_cache, by_threads);
  const int64_t tiles = (m.groups + tile_groups - 1) / tile_groups;
  const int64_t ldacc = tile_groups * m.group;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(T * ldacc);
    float* acc = buf.data();
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t g0 = tile * tile_groups, g1 = std::min(m.groups, g0 + tile_groups);
      const int64_t c0 = g0 * m.group, width = (g1 - g0) * m.group;
      std::fill(acc, acc + T * ldacc, 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        V8 hv[kMaxFusedTokens];
        bool any = false;
        for (int64_t t = 0; t < T; ++t) {
          const float v = h[t * n + i];
          any |= v != 0.0f;
          hv[t] = v_set1(v);
        }
        if (!any) continue;  // an exactly-zero activation adds nothing
        m.blocks(row_of(rows, i), g0, g1, [&](int64_t col, const V8* w) {
          for (int64_t t = 0; t < T; ++t) {
            float* a = acc + t * ldacc + (col - c0);
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) v_store(a + 8 * j, v_fma(w[j], hv[t], v_load(a + 8 * j)));
          }
        });
      }
      for (int64_t t = 0; t < T; ++t) std::memcpy(out + t * m.cols + c0, acc + t * ldacc, width * sizeof(float));
    }
  });
}

// 8 floats -> 8 bf16, round to nearest even (weights are finite, so no NaN handling is needed).
#if MOEPACK_AVX2
inline void store_bf16(uint16_t* p, V8 a) {
  __m256i b = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  // every lane is now in [0, 0xFFFF], so the unsigned-saturating pack is exact
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#else
inline void store_bf16(uint16_t* p, V8 a) {
  for (int i = 0; i < 8; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &a.v[i], 4);
    p[i] = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}
#endif

inline void store_out(float* p, V8 a) { v_store(p, a); }
inline void store_out(uint16_t* p, V8 a) { store_bf16(p, a); }

// W[rows] decoded into `out` [n, cols]: float (exact) or uint16_t (bf16, rounded to nearest even).
template <class M, class Out>
void dequant_rows(const M& m, const int64_t* rows, int64_t n, Out* out) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Out* o = out + i * m.cols;
      m.blocks(row_of(rows, i), 0, m.groups, [&](int64_t col, const V8* w) {
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) store_out(o + col + 8 * j, w[j]);
      });
    }
  });
}

// --- argument checking and dispatch ------------------------------------------------------------------
// Checks a quantised matrix and calls f(QuantRows<B>) with its bit width as a compile-time constant.
template <class F>
void with_quant_rows(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                     int64_t group, int64_t cols, F&& f) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "moepack_cpu: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(group > 0 && group % 32 == 0, "moepack_cpu: group must be a positive multiple of 32, got ", group);
  TORCH_CHECK(cols > 0 && cols % group == 0, "moepack_cpu: cols (", cols, ") must be a multiple of group ", group);
  TORCH_CHECK(codes.device().is_cpu() && scale.device().is_cpu() && zero.device().is_cpu(),
              "moepack_cpu: tensors must be on the CPU");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "moepack_cpu: codes must be a contiguous uint8 matrix");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && zero.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  zero.is_contiguous(),
              "moepack_cpu: scale and zero must be contiguous float16");
  const int64_t rows = codes.size(0), groups = cols / group;
  TORCH_CHECK(codes.size(1) == cols * bits / 8, "moepack_cpu: codes has ", codes.size(1), " bytes per row, expected ",
              cols * bits / 8);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == rows && scale.size(1) == groups && zero.sizes() == scale.sizes(),
              "moepack_cpu: scale and zero must be [", rows, ", ", groups, "]");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const auto* sc = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const auto* ze = reinterpret_cast<const uint16_t*>(zero.data_ptr<at::Half>());
  switch (bits) {
    case 2: f(QuantRows<2>{c, sc, ze, cols * 2 / 8, groups, group, cols}); break;
    case 3: f(QuantRows<3>{c, sc, ze, cols * 3 / 8, groups, group, cols}); break;
    default: f(QuantRows<4>{c, sc, ze, cols * 4 / 8, groups, group, cols}); break;
  }
}

// Checks a bf16/fp16 matrix and calls f(WideRows<is bf16>).
template <class F>
void with_wide_rows(const at::Tensor& w, F&& f) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf),
              "moepack_cpu: w must be a bfloat16 or float16 CPU matrix");
  TORCH_CHECK(w.stride(1) == 1 && w.stride(0) >= w.size(1), "moepack_cpu: w must have unit column stride");
  const int64_t cols = w.size(1);
  TORCH_CHECK(cols > 0 && cols % 32 == 0, "moepack_cpu: passthrough cols (", cols, ") must be a multiple of 32");
  const auto* data = reinterpret_cast<const uint16_t*>(w.data_ptr());
  if (w.scalar_type() == at::kBFloat16)
    f(WideRows<true>{data, w.stride(0), cols / 32, cols});
  else
    f(WideRows<false>{data, w.stride(0), cols / 32, cols});
}

// Validates the optional row subset; returns its data pointer (nullptr for all rows) and its length.
const int64_t* check_rows(const c10::optional<at::Tensor>& rows, int64_t total, int64_t* n) {
  if (!rows.has_value()) {
    *n = total;
    return nullptr;
  }
  const at::Tensor& r = *rows;
  TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1 && r.is_contiguous() && r.device().is_cpu(),
              "moepack_cpu: rows must be a contiguous int64 vector on the CPU");
  *n = r.size(0);
  const int64_t* p = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < *n; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < total, "moepack_cpu: row index ", p[i], " out of range [0, ", total, ")");
  return p;
}

// x [T, cols] -> [T, n] = x @ W[rows].T, in blocks of at most 4 tokens.
template <class M>
at::Tensor rows_matmul(const M& m, const at::Tensor& x, int64_t total_rows, const c10::optional<at::Tensor>& rows,
                       const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "moepack_cpu.", op,
              ": x must be a float32 CPU matrix [T, cols]");
  TORCH_CHECK(x.size(1) == m.cols, "moepack_cpu.", op, ": x has ", x.size(1), " columns, expected ", m.cols);
  int64_t n;
  const int64_t* r = check_rows(rows, total_rows, &n);
  const at::Tensor xc = x.contiguous();
  const int64_t T = xc.size(0), cols = m.cols;
  at::Tensor out = at::empty({T, n}, xc.options());
  if (T == 0 || n == 0) return out;
  const float* xp = xc.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) matmul_block<4>(m, xp + t * cols, cols, r, n, op_ + t * n, n);
  switch (T - t) {
    case 3: matmul_block<3>(m, xp + t * cols, cols, r, n, op_ + t * n, n); break;
    case 2: matmul_block<2>(m, xp + t * cols, cols, r, n, op_ + t * n, n); break;
    case 1: matmul_block<1>(m, xp + t * cols, cols, r, n, op_ + t * n, n); break;
    default: break;
  }
  return out;
}

// h [T, n] -> [T, cols] = h @ W[rows], in blocks of at most kMaxFusedTokens tokens.
template <class M>
at::Tensor rows_matmul_t(const M& m, const at::Tensor& h, int64_t total_rows, const c10::optional<at::Tensor>& rows,
                         const char* op) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.device().is_cpu(), "moepack_cpu.", op,
              ": h must be a float32 CPU matrix [T, n]");
  int64_t n;
  const int64_t* r = check_rows(rows, total_rows, &n);
  TORCH_CHECK(h.size(1) == n, "moepack_cpu.", op, ": h has ", h.size(1), " columns, expected ", n);
  const at::Tensor hc = h.contiguous();
  const int64_t T = hc.size(0);
  at::Tensor out = at::zeros({T, m.cols}, hc.options());
  if (T == 0 || n == 0) return out;
  for (int64_t t = 0; t < T; t += kMaxFusedTokens) {
    const int64_t nt = std::min(kMaxFusedTokens, T - t);
    matmul_t_tiles(m, hc.data_ptr<float>() + t * n, nt, r, n, out.data_ptr<float>() + t * m.cols);
  }
  return out;
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                   const c10::optional<at::Tensor>& rows, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2, "moepack_cpu.qmatmul: x must be a float32 CPU matrix [T, cols]");
  at::Tensor out;
  with_quant_rows(codes, scale, zero, bits, group, x.size(1),
                  [&](const auto& m) { out = rows_matmul(m, x, codes.size(0), rows, "qmatmul"); });
  return out;
}

at::Tensor qmatmul_t(const at::Tensor& h, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                     const c10::optional<at::Tensor>& rows, int64_t bits, int64_t group, int64_t cols) {
  at::Tensor out;
  with_quant_rows(codes, scale, zero, bits, group, cols,
                  [&](const auto& m) { out = rows_matmul_t(m, h, codes.size(0), rows, "qmatmul_t"); });
  return out;
}

at::Tensor qdequant(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                    const c10::optional<at::Tensor>& rows, int64_t bits, int64_t group, int64_t cols, bool bf16) {
  at::Tensor out;
  with_quant_rows(codes, scale, zero, bits, group, cols, [&](const auto& m) {
    int64_t n;
    const int64_t* r = check_rows(rows, codes.size(0), &n);
    out = at::empty({n, cols}, at::TensorOptions().dtype(bf16 ? at::kBFloat16 : at::kFloat));
    if (n == 0) return;
    if (bf16)
      dequant_rows(m, r, n, reinterpret_cast<uint16_t*>(out.data_ptr()));
    else
      dequant_rows(m, r, n, out.data_ptr<float>());
  });
  return out;
}

at::Tensor pmatmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& rows) {
  at::Tensor out;
  with_wide_rows(w, [&](const auto& m) { out = rows_matmul(m, x, w.size(0), rows, "pmatmul"); });
  return out;
}

at::Tensor pmatmul_t(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& rows) {
  at::Tensor out;
  with_wide_rows(w, [&](const auto& m) { out = rows_matmul_t(m, h, w.size(0), rows, "pmatmul_t"); });
  return out;
}

bool has_avx2() { return MOEPACK_AVX2; }

}  // namespace

TORCH_LIBRARY(moepack_cpu, m) {
  m.def("qmatmul(Tensor x, Tensor codes, Tensor scale, Tensor zero, Tensor? rows, int bits, int group) -> Tensor");
  m.def(
      "qmatmul_t(Tensor h, Tensor codes, Tensor scale, Tensor zero, Tensor? rows, int bits, int group, int cols) "
      "-> Tensor");
  m.def(
      "qdequant(Tensor codes, Tensor scale, Tensor zero, Tensor? rows, int bits, int group, int cols, bool bf16=False) "
      "-> Tensor");
  m.def("pmatmul(Tensor x, Tensor w, Tensor? rows) -> Tensor");
  m.def("pmatmul_t(Tensor h, Tensor w, Tensor? rows) -> Tensor");
  m.def("simd() -> bool", [] { return has_avx2(); });
}

TORCH_LIBRARY_IMPL(moepack_cpu, CPU, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("qmatmul_t", &qmatmul_t);
  m.impl("qdequant", &qdequant);
  m.impl("pmatmul", &pmatmul);
  m.impl("pmatmul_t", &pmatmul_t);
}
