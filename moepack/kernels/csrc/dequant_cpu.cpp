// Fused dequantise-and-multiply for moepack group quantisation (q2/q3/q4, groups of a multiple of 32) and
// bf16/fp16 passthrough on the CPU: the ATen glue, thread partitioning and run-time ISA dispatch.
//
// Payload (docs/format.md, "Codecs"): codes uint8 [rows, ceil(cols*b/8)] (a little-endian bitstream per
// row), scale fp16 [rows, ceil(cols/G)], zero fp16 [rows, ceil(cols/G)]; w = (q - zero) * scale, computed
// in fp32. Any cols: the last group may be ragged (format version 2); x is then padded with zeros to a
// multiple of 32 columns for the products (cpu_table.h). Double-quantised metadata (recipe q{b}g{G}d): pass
// the u8 codes gscale and gzero as scale and zero and the fp16 [rows, 3] factors as `rowq`; the kernels
// compute each group's scale and zero from them as they go (group_sz), nothing is expanded beforehand.
//
// The kernels are compiled once per instruction set (isa_*.cpp: generic, avx2, avx512, avx512_vnni) and
// the best table the CPU supports is chosen when the library loads (__builtin_cpu_supports), so one build
// serves every x86-64 machine; set_isa picks a lower one (tests, MOEPACK_CPU_ISA). Work is split with
// at::parallel_for (rows handed out in blocks from a shared counter), so torch.set_num_threads governs it.
//
// Ops (registered with torch.library under the namespace moepack_cpu):
//   qmatmul(x[T,cols], ..., rows?)       -> [T, n]    = x @ W[rows].T   (row dot products)
//   qmatmul_t(h[T,n], ..., rows?, cols)  -> [T, cols] = h @ W[rows]     (weighted sum of rows)
//   qdequant(..., rows?, cols, bf16, out?) -> [n, cols] = W[rows] in fp32, or rounded to bf16 (nearest even);
//                                       into the first n rows of `out` when given (a buffer reused across
//                                       blocks: a fresh multi-MiB tensor per block costs page faults)
//   pmatmul(x[T,cols], w, rows?)         -> [T, n]    (w bf16/fp16 [rows, cols])
//   pmatmul_t(h[T,n], w, rows?)          -> [T, cols]
//   isa() / isas() / set_isa(name)       the table in use / those this CPU can run, best first / choose
//   set_q8(planes) -> previous           int8 activation planes for qmatmul of q2/q4 where the ISA has an
//                                        integer GEMV: 2 (default: ~15-bit activations), 1 (int8, as
//                                        llama.cpp's q8), 0 (the exact fp32 kernels)
// qmatmul with the integer GEMV quantises each token per block of 32 values (scale amax/127; with two
// planes, a second int8 plane holds the residual x128), so it differs from the reference by that
// rounding (tests state the bounds); everything else differs only in fp32 accumulation order. Token counts up to 8 run fused; the Python wrapper sends larger T
// through a dequantised (or widened) block of rows and a BLAS matmul.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_table.h"

namespace {

using moepack_cpu::Q8X;
using moepack_cpu::QMat;
using moepack_cpu::Table;
using moepack_cpu::WMat;

constexpr int64_t kMaxFusedTokens = 8;

// --- ISA dispatch ------------------------------------------------------------------------------------
struct Isa {
  const char* name;
  bool (*supported)();
  const Table* (*table)();
};

bool cpu_generic() { return true; }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
bool cpu_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool cpu_avx512() {
  return cpu_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_avx512_vnni() { return cpu_avx512() && __builtin_cpu_supports("avx512vnni"); }
#else
bool cpu_avx2() { return false; }
bool cpu_avx512() { return false; }
bool cpu_avx512_vnni() { return false; }
#endif

const Isa kIsas[] = {  // best first
    {"avx512_vnni", cpu_avx512_vnni, moepack_cpu::table_avx512_vnni},
    {"avx512", cpu_avx512, moepack_cpu::table_avx512},
    {"avx2", cpu_avx2, moepack_cpu::table_avx2},
    {"generic", cpu_generic, moepack_cpu::table_generic},
};

std::vector<std::string> usable_isas() {
  std::vector<std::string> out;
  for (const Isa& i : kIsas)
    if (i.supported() && i.table() != nullptr) out.push_back(i.name);
  return out;
}

const Table* best_table() {
  for (const Isa& i : kIsas)
    if (i.supported() && i.table() != nullptr) return i.table();
  return moepack_cpu::table_generic();
}

std::atomic<const Table*> g_table{nullptr};
std::atomic<int> g_q8{2};  // int8 planes of the activations: 0 (fp32 kernels), 1 or 2

const Table& table() {
  const Table* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

std::string set_isa(const std::string& name) {
  for (const Isa& i : kIsas) {
    if (name != i.name) continue;
    TORCH_CHECK(i.supported() && i.table() != nullptr, "moepack_cpu: this CPU cannot run the ", name,
                " kernels; it can run ", c10::Join(", ", usable_isas()));
    g_table.store(i.table(), std::memory_order_release);
    return name;
  }
  TORCH_CHECK(false, "moepack_cpu: unknown ISA '", name, "'; choose one of avx512_vnni, avx512, avx2, generic");
  return name;
}

// --- argument checking -------------------------------------------------------------------------------
QMat check_quant(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                 int64_t group, int64_t cols, const c10::optional<at::Tensor>& rowq) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "moepack_cpu: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(group > 0 && group % 32 == 0, "moepack_cpu: group must be a positive multiple of 32, got ", group);
  TORCH_CHECK(cols > 0, "moepack_cpu: cols must be positive, got ", cols);
  TORCH_CHECK(codes.device().is_cpu() && scale.device().is_cpu() && zero.device().is_cpu(),
              "moepack_cpu: tensors must be on the CPU");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "moepack_cpu: codes must be a contiguous uint8 matrix");
  const bool dq = rowq.has_value();
  const auto meta = dq ? at::kByte : at::kHalf;
  TORCH_CHECK(scale.scalar_type() == meta && zero.scalar_type() == meta && scale.is_contiguous() && zero.is_contiguous(),
              "moepack_cpu: scale and zero must be contiguous ", dq ? "uint8 codes (with rowq)" : "float16");
  const int64_t rows = codes.size(0), groups = (cols + group - 1) / group, row_bytes = (cols * bits + 7) / 8;
  TORCH_CHECK(codes.size(1) == row_bytes, "moepack_cpu: codes has ", codes.size(1), " bytes per row, expected ",
              row_bytes);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == rows && scale.size(1) == groups && zero.sizes() == scale.sizes(),
              "moepack_cpu: scale and zero must be [", rows, ", ", groups, "]");
  if (!dq)
    return QMat{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
                reinterpret_cast<const uint16_t*>(zero.data_ptr<at::Half>()), row_bytes, groups, group, cols,
                (int)bits};
  const at::Tensor& f = *rowq;
  TORCH_CHECK(f.device().is_cpu() && f.scalar_type() == at::kHalf && f.is_contiguous() && f.dim() == 2 &&
                  f.size(0) == rows && f.size(1) == 3,
              "moepack_cpu: rowq must be a contiguous float16 [", rows, ", 3] CPU tensor");
  QMat m{codes.data_ptr<uint8_t>(), nullptr, nullptr, row_bytes, groups, group, cols, (int)bits};
  m.gscale = scale.data_ptr<uint8_t>();
  m.gzero = zero.data_ptr<uint8_t>();
  m.rowq = reinterpret_cast<const uint16_t*>(f.data_ptr<at::Half>());
  return m;
}

WMat check_wide(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf),
              "moepack_cpu: w must be a bfloat16 or float16 CPU matrix");
  TORCH_CHECK(w.stride(1) == 1 && w.stride(0) >= w.size(1), "moepack_cpu: w must have unit column stride");
  const int64_t cols = w.size(1);
  TORCH_CHECK(cols > 0 && cols % 32 == 0, "moepack_cpu: passthrough cols (", cols, ") must be a multiple of 32");
  return WMat{reinterpret_cast<const uint16_t*>(w.data_ptr()), w.stride(0), cols / 32, cols,
              w.scalar_type() == at::kBFloat16};
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

// --- int8 activations for the integer GEMV (layout: cpu_gemv_q8.h) ------------------------------------
struct Q8Buffers {
  std::vector<int8_t> q;
  std::vector<float> d, c;
  std::vector<int32_t> gidx, gfirst;
  std::vector<uint8_t> scratch;
  Q8X view;
};

void q8_prepare(const Table& tb, const QMat& m, int planes, const float* x, int64_t ldx, int64_t T, Q8Buffers& b) {
  const int64_t chunk_codes = (int64_t)tb.q8_vec * (8 / m.bits), lanes = tb.q8_vec / 4;
  const int64_t cols32 = (m.cols + 31) / 32 * 32;
  const int64_t chunks = (cols32 + chunk_codes - 1) / chunk_codes, xs = chunks * chunk_codes;
  b.q.resize(planes * T * xs);
  b.d.resize(T * chunks * lanes);
  b.c.resize(T * m.groups);
  b.gidx.resize(chunks * lanes);
  b.gfirst.resize(chunks);
  b.scratch.resize(2 * cols32);
  b.view = Q8X{b.q.data(), b.d.data(), b.c.data(), b.gidx.data(), b.gfirst.data(), chunks, chunk_codes, lanes,
               planes == 2 ? T * xs : 0};
  tb.q8_prepare(m, x, ldx, T, b.view, b.q.data(), b.d.data(), b.c.data(), b.gidx.data(), b.gfirst.data(),
                b.scratch.data());
}

// --- the products ------------------------------------------------------------------------------------
// Rows per parallel task: enough to amortise a task (and, for the integer GEMV, the per-row setup).
constexpr int64_t kRowGrain = 16;

// f(i0, i1) over [0, n) on torch's threads, in blocks that the threads take in turn from a shared counter
// (about 8 per thread), not in one fixed share each: when the cores are shared with other work, or are of
// unequal speed, a thread that is held up leaves its blocks to the others instead of making all wait.
template <class F>
void parallel_rows(int64_t n, F&& f) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || n <= 2 * kRowGrain || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  const int64_t block = std::max<int64_t>(kRowGrain, (n + 8 * threads - 1) / (8 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i0 = next.fetch_add(block); i0 < n; i0 = next.fetch_add(block)) f(i0, std::min(n, i0 + block));
  });
}

template <class Run>
void for_token_blocks(int64_t T, Run&& run) {  // run(t0, nt) for blocks of at most 4 tokens
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) run(t, 4);
  if (t < T) run(t, (int)(T - t));
}

at::Tensor check_x(const at::Tensor& x, int64_t cols, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "moepack_cpu.", op,
              ": x must be a float32 CPU matrix [T, cols]");
  TORCH_CHECK(x.size(1) == cols, "moepack_cpu.", op, ": x has ", x.size(1), " columns, expected ", cols);
  return x.contiguous();
}

// x [T, cols] contiguous, or zero-padded to a multiple of 32 columns when cols is not one (the kernels
// read whole blocks of 32 activations; cpu_table.h). Returns the row stride.
at::Tensor padded_x(const at::Tensor& xc, int64_t cols, int64_t* ldx) {
  *ldx = (cols + 31) / 32 * 32;
  if (*ldx == cols) return xc;
  at::Tensor p = at::zeros({xc.size(0), *ldx}, xc.options());
  p.narrow(1, 0, cols).copy_(xc);
  return p;
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                   const c10::optional<at::Tensor>& rows, int64_t bits, int64_t group,
                   const c10::optional<at::Tensor>& rowq) {
  TORCH_CHECK(x.dim() == 2, "moepack_cpu.qmatmul: x must be a float32 CPU matrix [T, cols]");
  const QMat m = check_quant(codes, scale, zero, bits, group, x.size(1), rowq);
  int64_t ldx;
  const at::Tensor xc = padded_x(check_x(x, m.cols, "qmatmul"), m.cols, &ldx);
  int64_t n;
  const int64_t* r = check_rows(rows, codes.size(0), &n);
  const int64_t T = xc.size(0);
  at::Tensor out = at::empty({T, n}, xc.options());
  if (T == 0 || n == 0) return out;
  const Table& tb = table();
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int planes = g_q8.load(std::memory_order_relaxed);
  if (tb.q8_matmul != nullptr && bits != 3 && planes > 0) {
    Q8Buffers b;
    q8_prepare(tb, m, planes, xp, ldx, T, b);
    const int64_t xs = b.view.chunks * b.view.chunk_codes, ds = b.view.chunks * b.view.lanes;
    for_token_blocks(T, [&](int64_t t0, int nt) {
      Q8X v = b.view;
      v.q += t0 * xs;
      v.d += t0 * ds;
      v.c += t0 * m.groups;
      parallel_rows(n, [&](int64_t i0, int64_t i1) {
        std::vector<float> sf(4 * (m.groups + 32), 0.0f);  // four rows' scales
        tb.q8_matmul(m, v, nt, r, i0, i1, op + t0 * n, n, sf.data());
      });
    });
    return out;
  }
  for_token_blocks(T, [&](int64_t t0, int nt) {
    parallel_rows(n, [&](int64_t i0, int64_t i1) {
      tb.qmatmul(m, xp + t0 * ldx, ldx, nt, r, i0, i1, op + t0 * n, n);
    });
  });
  return out;
}

at::Tensor pmatmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& rows) {
  const WMat m = check_wide(w);
  const at::Tensor xc = check_x(x, m.cols, "pmatmul");
  int64_t n;
  const int64_t* r = check_rows(rows, w.size(0), &n);
  const int64_t T = xc.size(0);
  at::Tensor out = at::empty({T, n}, xc.options());
  if (T == 0 || n == 0) return out;
  const Table& tb = table();
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for_token_blocks(T, [&](int64_t t0, int nt) {
    parallel_rows(n, [&](int64_t i0, int64_t i1) {
      tb.pmatmul(m, xp + t0 * m.cols, m.cols, nt, r, i0, i1, op + t0 * n, n);
    });
  });
  return out;
}

// h [T, n] -> [T, cols] = h @ W[rows], parallel over column tiles: each tile accumulates in its own
// buffer (at most 32 KiB, so it stays in L1), so threads never share an output.
template <class M, class Tile>
at::Tensor rows_matmul_t(const M& m, int64_t unit, const at::Tensor& h, int64_t total_rows,
                         const c10::optional<at::Tensor>& rows, const char* op, Tile&& tile) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.device().is_cpu(), "moepack_cpu.", op,
              ": h must be a float32 CPU matrix [T, n]");
  int64_t n;
  const int64_t* r = check_rows(rows, total_rows, &n);
  TORCH_CHECK(h.size(1) == n, "moepack_cpu.", op, ": h has ", h.size(1), " columns, expected ", n);
  const at::Tensor hc = h.contiguous();
  const int64_t T = hc.size(0), units = m.groups;
  at::Tensor out = at::zeros({T, m.cols}, hc.options());
  if (T == 0 || n == 0) return out;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  for (int64_t t = 0; t < T; t += kMaxFusedTokens) {
    const int64_t nt = std::min(kMaxFusedTokens, T - t);
    const int64_t by_cache = std::max<int64_t>(1, (8192 / nt) / unit);
    const int64_t by_threads = std::max<int64_t>(1, (units + threads - 1) / threads);
    const int64_t tile_units = std::min(by_cache, by_threads);
    const int64_t tiles = (units + tile_units - 1) / tile_units, ldacc = tile_units * unit;
    const float* hp = hc.data_ptr<float>() + t * n;
    float* o = out.data_ptr<float>() + t * m.cols;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(nt * ldacc);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t g0 = k * tile_units, g1 = std::min(units, g0 + tile_units);
        const int64_t c0 = g0 * unit, width = std::min(g1 * unit, m.cols) - c0;  // a ragged last unit
        std::fill(buf.begin(), buf.end(), 0.0f);
        tile(hp, nt, r, n, g0, g1, buf.data(), ldacc);
        for (int64_t tt = 0; tt < nt; ++tt) std::memcpy(o + tt * m.cols + c0, buf.data() + tt * ldacc, width * sizeof(float));
      }
    });
  }
  return out;
}

at::Tensor qmatmul_t(const at::Tensor& h, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                     const c10::optional<at::Tensor>& rows, int64_t bits, int64_t group, int64_t cols,
                     const c10::optional<at::Tensor>& rowq) {
  const QMat m = check_quant(codes, scale, zero, bits, group, cols, rowq);
  const Table& tb = table();
  return rows_matmul_t(m, m.group, h, codes.size(0), rows, "qmatmul_t",
                       [&](const float* hp, int64_t nt, const int64_t* r, int64_t n, int64_t g0, int64_t g1,
                           float* acc, int64_t ldacc) { tb.qmatmul_t(m, hp, nt, r, n, g0, g1, acc, ldacc); });
}

at::Tensor pmatmul_t(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& rows) {
  const WMat m = check_wide(w);
  const Table& tb = table();
  return rows_matmul_t(m, 32, h, w.size(0), rows, "pmatmul_t",
                       [&](const float* hp, int64_t nt, const int64_t* r, int64_t n, int64_t g0, int64_t g1,
                           float* acc, int64_t ldacc) { tb.pmatmul_t(m, hp, nt, r, n, g0, g1, acc, ldacc); });
}

at::Tensor qdequant(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                    const c10::optional<at::Tensor>& rows, int64_t bits, int64_t group, int64_t cols, bool bf16,
                    const c10::optional<at::Tensor>& rowq, const c10::optional<at::Tensor>& into) {
  const QMat m = check_quant(codes, scale, zero, bits, group, cols, rowq);
  int64_t n;
  const int64_t* r = check_rows(rows, codes.size(0), &n);
  const auto dtype = bf16 ? at::kBFloat16 : at::kFloat;
  at::Tensor out;
  if (into.has_value()) {
    const at::Tensor& b = *into;
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == dtype && b.dim() == 2 && b.is_contiguous() &&
                    b.size(0) >= n && b.size(1) == cols,
                "moepack_cpu.qdequant: out must be a contiguous CPU ", bf16 ? "bfloat16" : "float32",
                " tensor of at least [", n, ", ", cols, "], got ", b.scalar_type(), " ", b.sizes());
    out = b.narrow(0, 0, n);
  } else {
    out = at::empty({n, cols}, at::TensorOptions().dtype(dtype));
  }
  if (n == 0) return out;
  const Table& tb = table();
  parallel_rows(n, [&](int64_t i0, int64_t i1) {
    if (bf16)
      tb.qdequant_bf16(m, r, i0, i1, reinterpret_cast<uint16_t*>(out.data_ptr()));
    else
      tb.qdequant(m, r, i0, i1, out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(moepack_cpu, m) {
  m.def(
      "qmatmul(Tensor x, Tensor codes, Tensor scale, Tensor zero, Tensor? rows, int bits, int group, "
      "Tensor? rowq=None) -> Tensor");
  m.def(
      "qmatmul_t(Tensor h, Tensor codes, Tensor scale, Tensor zero, Tensor? rows, int bits, int group, int cols, "
      "Tensor? rowq=None) -> Tensor");
  m.def(
      "qdequant(Tensor codes, Tensor scale, Tensor zero, Tensor? rows, int bits, int group, int cols, bool bf16=False, "
      "Tensor? rowq=None, Tensor(a!)? out=None) -> Tensor");
  m.def("pmatmul(Tensor x, Tensor w, Tensor? rows) -> Tensor");
  m.def("pmatmul_t(Tensor h, Tensor w, Tensor? rows) -> Tensor");
  m.def("isa() -> str", [] { return std::string(table().name); });
  m.def("isas() -> str[]", [] { return usable_isas(); });
  m.def("set_isa(str name) -> str", [](const std::string& name) { return set_isa(name); });
  m.def("set_q8(int planes) -> int", [](int64_t planes) {
    TORCH_CHECK(planes >= 0 && planes <= 2, "moepack_cpu.set_q8: planes must be 0, 1 or 2, got ", planes);
    return (int64_t)g_q8.exchange((int)planes);
  });
  m.def("q8() -> int", [] { return table().q8_matmul != nullptr ? (int64_t)g_q8.load() : (int64_t)0; });
}

TORCH_LIBRARY_IMPL(moepack_cpu, CPU, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("qmatmul_t", &qmatmul_t);
  m.impl("qdequant", &qdequant);
  m.impl("pmatmul", &pmatmul);
  m.impl("pmatmul_t", &pmatmul_t);
}
