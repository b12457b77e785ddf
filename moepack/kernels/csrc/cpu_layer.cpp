// One decoder layer's dense work for ONE token in one compiled call (decode on the CPU, float32 compute):
//
//   x = rms_norm(h, in_norm); qkv = x @ Wqkv.T (+ bias); [OLMoE: rms_norm of q and of k over the whole
//   projection]; [clamp to +-clip]; [Qwen3: rms_norm per head of q and k]; rotary embedding of q and k;
//   k, v written into the layer's KV cache at `pos`; attention of q over the cached keys 0..pos (or the
//   last `window`), grouped-query; h += attn @ Wo.T (+ bias); x = rms_norm(h, post_norm);
//   router logits = x @ Wr.T (+ bias), softmax (float32), top-k, renormalised when norm_topk.
//
//   decode_layer(h[1,H], cos[.., r], sin[.., r], k_cache[1,nkv,cap,d], v_cache, pos, in_norm, post_norm,
//                Wqkv, qkv_b?, q_norm?, k_norm?, qk_norm, clip, window, Wo, o_b?, Wr?, r_b?, top_k,
//                norm_topk, heads, kv_heads, eps, scale)
//     -> (h[1,H], x[1,H], logits[1,E], ids[1,k] int64, weights[1,k])   (no router: E = k = 0)
//
// This is the same arithmetic as the Python forward (moepack/runtime/model.py, layers.py), which stays the
// reference; only the float32 summation order differs (and FMA contraction), so results agree to float
// tolerance. It exists because at one token the Python forward's cost is many small torch calls per layer,
// each far more expensive than its arithmetic on a small model. Weight matrices may be float32, bf16 or
// fp16 (widened on the fly); everything else is float32. qk_norm: 0 none, 1 per head (q_norm is the
// [heads + kv_heads, d] table of head weights), 2 over the whole q / k projection (q_norm [heads*d],
// k_norm [kv_heads*d]). clip <= 0: no clamp. window <= 0: full causal attention. cos/sin: the rows of the
// rotary table at this position, r <= d (partial rotary: the first r dims rotate).
//
// The hot loops are compiled three times (x86-64-v4, -v3 and baseline, GCC/clang target_clones) and the
// loader picks the best one the CPU has; elsewhere they are plain C++.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MP_CLONES
#endif

enum Kind : int { F32 = 0, BF16 = 1, F16 = 2 };

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {  // IEEE half -> float, subnormals and inf/nan included
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

constexpr int LANES = 16;

// y[i] = W[i] . x for rows [r0, r1) of W (row stride ld), 16 independent partial sums per row so the
// compiler vectorises without reassociating anything it was not told to. Always inlined into the cloned
// callers below, so each clone compiles it for its own instruction set.
template <class T, class Load>
__attribute__((always_inline)) inline void dot_rows(const T* w, int64_t ld, const float* x, int64_t n, int64_t r0,
                                                    int64_t r1, float* y, Load load) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = w + r * ld;
    float acc[LANES] = {0};
    int64_t c = 0;
    for (; c + LANES <= n; c += LANES)
      for (int j = 0; j < LANES; ++j) acc[j] += load(row[c + j]) * x[c + j];
    float s = 0.f;
    for (; c < n; ++c) s += load(row[c]) * x[c];
    for (int j = 0; j < LANES; ++j) s += acc[j];
    y[r] = s;
  }
}

MP_CLONES void dot_rows_f32(const float* w, int64_t ld, const float* x, int64_t n, int64_t r0, int64_t r1,
                            float* y) {
  dot_rows(w, ld, x, n, r0, r1, y, [](float v) { return v; });
}

MP_CLONES void dot_rows_bf16(const uint16_t* w, int64_t ld, const float* x, int64_t n, int64_t r0, int64_t r1,
                             float* y) {
  dot_rows(w, ld, x, n, r0, r1, y, [](uint16_t v) { return bf16_to_f32(v); });
}

void dot_rows_f16(const uint16_t* w, int64_t ld, const float* x, int64_t n, int64_t r0, int64_t r1, float* y) {
  std::vector<float> row(n);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < n; ++c) row[c] = f16_to_f32(w[r * ld + c]);
    dot_rows_f32(row.data(), n, x, n, 0, 1, y + r);
  }
}

// y [rows] = W [rows, n] @ x [n] (+ bias), split over threads when the matrix is large.
void matvec(const at::Tensor& w, const float* x, float* y, const c10::optional<at::Tensor>& bias) {
  const int64_t rows = w.size(0), n = w.size(1), ld = w.stride(0);
  const auto st = w.scalar_type();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(n, 1));
  auto body = [&](int64_t r0, int64_t r1) {
    if (st == at::kFloat)
      dot_rows_f32(w.data_ptr<float>(), ld, x, n, r0, r1, y);
    else if (st == at::kBFloat16)
      dot_rows_bf16(reinterpret_cast<const uint16_t*>(w.data_ptr()), ld, x, n, r0, r1, y);
    else
      dot_rows_f16(reinterpret_cast<const uint16_t*>(w.data_ptr()), ld, x, n, r0, r1, y);
  };
  if (rows <= grain)
    body(0, rows);
  else
    at::parallel_for(0, rows, grain, body);
  if (bias.has_value()) {
    const float* b = bias->data_ptr<float>();
    for (int64_t i = 0; i < rows; ++i) y[i] += b[i];
  }
}

// out = x * rsqrt(mean(x^2) + eps) (* w when given), as torch.rms_norm in float32.
MP_CLONES void rms(const float* x, const float* w, int64_t n, float eps, float* out) {
  float acc[LANES] = {0};
  int64_t c = 0;
  for (; c + LANES <= n; c += LANES)
    for (int j = 0; j < LANES; ++j) acc[j] += x[c + j] * x[c + j];
  float s = 0.f;
  for (; c < n; ++c) s += x[c] * x[c];
  for (int j = 0; j < LANES; ++j) s += acc[j];
  const float inv = 1.f / std::sqrt(s / static_cast<float>(n) + eps);
  if (w != nullptr)
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
  else
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv;
}

// transformers' rotary embedding of one head x [d] in place: the first r dims rotate (rotate_half).
void rope(float* x, const float* cos, const float* sin, int64_t r) {
  const int64_t half = r / 2;
  float tmp[1024];
  std::vector<float> big;
  float* rot = tmp;
  if (r > 1024) {
    big.resize(r);
    rot = big.data();
  }
  for (int64_t i = 0; i < half; ++i) rot[i] = -x[i + half];
  for (int64_t i = half; i < r; ++i) rot[i] = x[i - half];
  for (int64_t i = 0; i < r; ++i) x[i] = x[i] * cos[i] + rot[i] * sin[i];
}

// One query head q [d] over keys/values [s, d] (row stride d) from key k0: out [d].
MP_CLONES void attend_head(const float* q, const float* k, const float* v, int64_t k0, int64_t s, int64_t d,
                           float scale, float* scores, float* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = k0; j < s; ++j) {
    const float* kj = k + j * d;
    float acc = 0.f;
    for (int64_t c = 0; c < d; ++c) acc += q[c] * kj[c];
    scores[j] = acc * scale;
    mx = std::max(mx, scores[j]);
  }
  float sum = 0.f;
  for (int64_t j = k0; j < s; ++j) {
    scores[j] = std::exp(scores[j] - mx);
    sum += scores[j];
  }
  for (int64_t c = 0; c < d; ++c) out[c] = 0.f;
  for (int64_t j = k0; j < s; ++j) {
    const float p = scores[j];
    const float* vj = v + j * d;
    for (int64_t c = 0; c < d; ++c) out[c] += p * vj[c];
  }
  const float inv = 1.f / sum;
  for (int64_t c = 0; c < d; ++c) out[c] *= inv;
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "moepack_cpu::decode_layer: ", what); }

void check_matrix(const at::Tensor& w, int64_t cols, const char* what) {
  check(w.dim() == 2 && w.size(1) == cols && w.stride(1) == 1, what);
  check(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
        "weights must be float32, bf16 or fp16");
}

const float* f32(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value()) return nullptr;
  check(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, what);
  return t->data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> decode_layer(
    const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
    const at::Tensor& v_cache,
    int64_t pos, const at::Tensor& in_norm, const at::Tensor& post_norm, const at::Tensor& qkv_w,
    const c10::optional<at::Tensor>& qkv_b, const c10::optional<at::Tensor>& q_norm,
    const c10::optional<at::Tensor>& k_norm, int64_t qk_norm, double clip, int64_t window, const at::Tensor& o_w,
    const c10::optional<at::Tensor>& o_b, const c10::optional<at::Tensor>& router_w,
    const c10::optional<at::Tensor>& router_b, int64_t top_k, bool norm_topk, int64_t heads, int64_t kv_heads,
    double eps, double scale) {
  check(h.scalar_type() == at::kFloat && h.is_contiguous() && h.dim() == 2 && h.size(0) == 1,
        "h must be one float32 row [1, H]");
  const int64_t H = h.size(1), nh = heads, nkv = kv_heads;
  check(nh > 0 && nkv > 0 && nh % nkv == 0, "heads must be a multiple of kv_heads");
  check(k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.size(1) == nkv && k_cache.is_contiguous() &&
            k_cache.scalar_type() == at::kFloat && v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() &&
            v_cache.scalar_type() == at::kFloat,
        "the KV cache must be float32 [1, kv_heads, capacity, head_dim], contiguous");
  const int64_t d = k_cache.size(3), cap = k_cache.size(2);
  check(pos >= 0 && pos < cap, "pos is outside the cache's capacity");
  const int64_t nq = nh * d, nk = nkv * d, nqkv = nq + 2 * nk;
  check_matrix(qkv_w, H, "qkv weight must be [(heads + 2 kv_heads) head_dim, H]");
  check(qkv_w.size(0) == nqkv, "qkv weight must be [(heads + 2 kv_heads) head_dim, H]");
  check_matrix(o_w, nq, "o weight must be [H, heads head_dim]");
  check(o_w.size(0) == H, "o weight must be [H, heads head_dim]");
  const int64_t r = cos.size(-1);
  check(r <= d && r % 2 == 0 && sin.size(-1) == r && cos.scalar_type() == at::kFloat &&
            sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() && cos.numel() == r &&
            sin.numel() == r,
        "cos/sin must be float32 rows of an even width r <= head_dim");
  const float* in_w = f32(in_norm, H, "input norm must be float32 [H]");
  const float* post_w = f32(post_norm, H, "post-attention norm must be float32 [H]");
  check(in_w != nullptr && post_w != nullptr, "norm weights are required");
  const float* qn = nullptr;
  const float* kn = nullptr;
  if (qk_norm == 1) {
    qn = f32(q_norm, (nh + nkv) * d, "per-head norm weights must be float32 [heads + kv_heads, head_dim]");
    check(qn != nullptr, "qk_norm 1 needs the per-head norm weights");
  } else if (qk_norm == 2) {
    qn = f32(q_norm, nq, "q norm must be float32 [heads head_dim]");
    kn = f32(k_norm, nk, "k norm must be float32 [kv_heads head_dim]");
    check(qn != nullptr && kn != nullptr, "qk_norm 2 needs q and k norm weights");
  } else {
    check(qk_norm == 0, "qk_norm must be 0, 1 or 2");
  }
  f32(qkv_b, nqkv, "qkv bias must be float32 [(heads + 2 kv_heads) head_dim]");
  f32(o_b, H, "o bias must be float32 [H]");

  const auto opts = h.options();
  at::Tensor h_out = at::empty({1, H}, opts), x_out = at::empty({1, H}, opts);
  std::vector<float> x(H), qkv(nqkv), attn(nq), o(H);
  const float* hp = h.data_ptr<float>();
  const float feps = static_cast<float>(eps);

  rms(hp, in_w, H, feps, x.data());
  matvec(qkv_w, x.data(), qkv.data(), qkv_b);
  float* q = qkv.data();
  float* k = q + nq;
  float* v = k + nk;
  if (qk_norm == 2) {
    rms(q, qn, nq, feps, q);
    rms(k, kn, nk, feps, k);
  }
  if (clip > 0) {
    const float c = static_cast<float>(clip);
    for (int64_t i = 0; i < nqkv; ++i) qkv[i] = std::min(std::max(qkv[i], -c), c);
  }
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  for (int64_t head = 0; head < nh + nkv; ++head) {  // q and k heads side by side, as in the reference
    float* z = q + head * d;
    if (qk_norm == 1) {
      rms(z, nullptr, d, feps, z);
      for (int64_t c = 0; c < d; ++c) z[c] *= qn[head * d + c];
    }
    rope(z, cs, sn, r);
  }
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t j = 0; j < nkv; ++j) {
    std::memcpy(kc + (j * cap + pos) * d, k + j * d, d * sizeof(float));
    std::memcpy(vc + (j * cap + pos) * d, v + j * d, d * sizeof(float));
  }
  const int64_t s = pos + 1;
  const int64_t k0 = window > 0 ? std::max<int64_t>(0, s - window) : 0;
  const int64_t group = nh / nkv;
  auto heads_body = [&](int64_t a, int64_t b) {
    std::vector<float> sc(s);
    for (int64_t head = a; head < b; ++head) {
      const int64_t j = head / group;
      attend_head(q + head * d, kc + j * cap * d, vc + j * cap * d, k0, s, d, static_cast<float>(scale),
                  sc.data(), attn.data() + head * d);
    }
  };
  if ((s - k0) * d * nh < (int64_t{1} << 16))
    heads_body(0, nh);
  else
    at::parallel_for(0, nh, 1, heads_body);
  matvec(o_w, attn.data(), o.data(), o_b);
  float* ho = h_out.data_ptr<float>();
  for (int64_t i = 0; i < H; ++i) ho[i] = hp[i] + o[i];
  float* xo = x_out.data_ptr<float>();
  rms(ho, post_w, H, feps, xo);

  if (!router_w.has_value()) {
    return {h_out, x_out, at::empty({1, 0}, opts), at::empty({1, 0}, opts.dtype(at::kLong)),
            at::empty({1, 0}, opts)};
  }
  check_matrix(*router_w, H, "router weight must be [experts, H]");
  const int64_t E = router_w->size(0);
  check(top_k >= 1 && top_k <= E, "top_k must be between 1 and the number of experts");
  f32(router_b, E, "router bias must be float32 [experts]");
  at::Tensor logits = at::empty({1, E}, opts);
  float* lg = logits.data_ptr<float>();
  matvec(*router_w, xo, lg, router_b);
  std::vector<float> p(E);
  float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
  for (int64_t e = 0; e < E; ++e) mx = std::max(mx, lg[e]);
  for (int64_t e = 0; e < E; ++e) {
    p[e] = std::exp(lg[e] - mx);
    sum += p[e];
  }
  for (int64_t e = 0; e < E; ++e) p[e] /= sum;
  std::vector<int64_t> order(E);
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                    [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  at::Tensor ids = at::empty({1, top_k}, opts.dtype(at::kLong)), wts = at::empty({1, top_k}, opts);
  int64_t* ip = ids.data_ptr<int64_t>();
  float* wp = wts.data_ptr<float>();
  float wsum = 0.f;
  for (int64_t i = 0; i < top_k; ++i) {
    ip[i] = order[i];
    wp[i] = p[order[i]];
    wsum += wp[i];
  }
  if (norm_topk)
    for (int64_t i = 0; i < top_k; ++i) wp[i] /= wsum;
  return {h_out, x_out, logits, ids, wts};
}

// --- the routed experts of one token ------------------------------------------------------------------
// moe_token(x[1,H], parts, meta, weights) = sum over experts e (in the order given) of
//   weights[e] * down_e(silu(gate_e(x)) * up_e(x))
// with each projection run by this library's own ops (pmatmul / qmatmul, pmatmul_t / qmatmul_t) through the
// dispatcher, so the numbers are those of the Python executor (runtime/expert_compute.expert_ffn) calling
// the same ops one by one. meta holds 4 ints per projection (gate, up, down of each expert): kind (0: a
// bf16/fp16 matrix, one part `values`; 1: group-quantised, three parts codes, scale, zero; 2: group-quantised
// with 8-bit metadata, four parts codes, gscale, gzero, rowq), bits, group, cols.
using MM = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&);
using QM = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const c10::optional<at::Tensor>&, int64_t, int64_t, const c10::optional<at::Tensor>&);
using QMT = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                       const c10::optional<at::Tensor>&);

template <class Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor moe_token(const at::Tensor& x, at::TensorList parts, at::IntArrayRef meta, at::ArrayRef<double> weights) {
  static const auto pm = handle<MM>("moepack_cpu::pmatmul");
  static const auto pmt = handle<MM>("moepack_cpu::pmatmul_t");
  static const auto qm = handle<QM>("moepack_cpu::qmatmul");
  static const auto qmt = handle<QMT>("moepack_cpu::qmatmul_t");
  const int64_t experts = static_cast<int64_t>(weights.size());
  check(experts >= 1 && static_cast<int64_t>(meta.size()) == 12 * experts, "moe_token: 4 ints per projection");
  check(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == 1 && x.is_contiguous(),
        "moe_token: x must be one contiguous float32 row");
  const c10::optional<at::Tensor> none;
  size_t p = 0;
  auto product = [&](int64_t proj, const at::Tensor& in, bool transposed) {
    const int64_t* m = meta.data() + 4 * proj;
    if (m[0] == 0) {
      check(p + 1 <= parts.size(), "moe_token: too few parts");
      const at::Tensor& w = parts[p++];
      return transposed ? pmt.call(in, w, none) : pm.call(in, w, none);
    }
    const size_t n = m[0] == 2 ? 4 : 3;
    check((m[0] == 1 || m[0] == 2) && p + n <= parts.size(), "moe_token: bad projection kind or too few parts");
    const at::Tensor &codes = parts[p], &scale = parts[p + 1], &zero = parts[p + 2];
    const c10::optional<at::Tensor> rowq = n == 4 ? c10::optional<at::Tensor>(parts[p + 3]) : none;
    p += n;
    return transposed ? qmt.call(in, codes, scale, zero, none, m[1], m[2], m[3], rowq)
                      : qm.call(in, codes, scale, zero, none, m[1], m[2], rowq);
  };
  at::Tensor out;
  for (int64_t e = 0; e < experts; ++e) {
    at::Tensor g = product(3 * e, x, false);
    at::Tensor u = product(3 * e + 1, x, false);
    at::Tensor y = product(3 * e + 2, at::silu(g) * u, true);
    at::Tensor v = y * weights[e];
    out = e == 0 ? v : out + v;
  }
  check(p == parts.size(), "moe_token: too many parts");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moepack_cpu, m) {
  m.def("moe_token(Tensor x, Tensor[] parts, int[] meta, float[] weights) -> Tensor");
  m.def(
      "decode_layer(Tensor h, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, "
      "Tensor in_norm, Tensor post_norm, Tensor qkv_w, Tensor? qkv_b, Tensor? q_norm, Tensor? k_norm, "
      "int qk_norm, float clip, int window, Tensor o_w, Tensor? o_b, Tensor? router_w, Tensor? router_b, "
      "int top_k, bool norm_topk, int heads, int kv_heads, float eps, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moepack_cpu, CPU, m) {
  m.impl("decode_layer", &decode_layer);
  m.impl("moe_token", &moe_token);
}
