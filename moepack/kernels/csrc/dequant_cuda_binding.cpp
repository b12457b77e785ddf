// torch.library binding of the CUDA kernels in dequant_cuda.cu (namespace moepack_cuda; the same op
// signatures as moepack_cpu in dequant_cpu.cpp). Only this file includes torch headers.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

extern "C" int moepack_cuda_qmatmul(const float* x, int T, int ldx, int cols, const uint8_t* codes,
                                    const void* scale, const void* zero, const void* rowq, const int64_t* rows,
                                    int n, int bits, int group, float* out, cudaStream_t stream);
extern "C" int moepack_cuda_qmatmul_t(const float* h, int T, int n, const uint8_t* codes, const void* scale,
                                      const void* zero, const void* rowq, const int64_t* rows, int cols, int bits,
                                      int group, float* out, cudaStream_t stream);
extern "C" int moepack_cuda_qdequant(const uint8_t* codes, const void* scale, const void* zero, const void* rowq,
                                     const int64_t* rows, int n, int cols, int bits, int group, float* out,
                                     cudaStream_t stream);

namespace {

// The kernels use 16-byte vector loads of codes: make sure the base pointer allows them.
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// scale and zero: fp16 [rows, groups], or with rowq (double-quantised metadata, recipe q{b}g{G}d) u8 codes
// under rowq's fp16 [rows, 3] factors. Returns rowq's data pointer (nullptr without).
const void* check_matrix(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                         int64_t group, int64_t cols, const at::Device& device,
                         const c10::optional<at::Tensor>& rowq, at::Tensor* rowq_keep) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "moepack_cuda: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(group > 0 && group % 32 == 0, "moepack_cuda: group must be a positive multiple of 32, got ", group);
  TORCH_CHECK(cols > 0, "moepack_cuda: cols must be positive, got ", cols);  // any cols: a ragged last group
  TORCH_CHECK(codes.device() == device && scale.device() == device && zero.device() == device,
              "moepack_cuda: all tensors must be on ", device);
  const int64_t row_bytes = (cols * bits + 7) / 8, groups = (cols + group - 1) / group;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.size(1) == row_bytes,
              "moepack_cuda: codes must be uint8 [rows, ", row_bytes, "]");
  const auto meta = rowq.has_value() ? at::kByte : at::kHalf;
  TORCH_CHECK(scale.scalar_type() == meta && zero.scalar_type() == meta && scale.dim() == 2 &&
                  scale.size(0) == codes.size(0) && scale.size(1) == groups && zero.sizes() == scale.sizes(),
              "moepack_cuda: scale and zero must be ", rowq.has_value() ? "uint8" : "float16", " [", codes.size(0),
              ", ", groups, "]");
  if (!rowq.has_value()) return nullptr;
  TORCH_CHECK(rowq->device() == device && rowq->scalar_type() == at::kHalf && rowq->dim() == 2 &&
                  rowq->size(0) == codes.size(0) && rowq->size(1) == 3,
              "moepack_cuda: rowq must be float16 [", codes.size(0), ", 3] on ", device);
  *rowq_keep = rowq->contiguous();
  return rowq_keep->data_ptr();
}

const int64_t* rows_ptr(const c10::optional<at::Tensor>& rows, const at::Tensor& codes, at::Tensor* keep,
                        int64_t* n) {
  if (!rows.has_value()) {
    *n = codes.size(0);
    return nullptr;
  }
  TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1 && rows->device() == codes.device(),
              "moepack_cuda: rows must be an int64 vector on ", codes.device());
  *keep = rows->contiguous();
  *n = keep->size(0);
  return keep->data_ptr<int64_t>();
}

void check_status(int status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "moepack_cuda.", op, ": ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                   const c10::optional<at::Tensor>& rows, int64_t bits, int64_t group,
                   const c10::optional<at::Tensor>& rowq) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.scalar_type() == at::kFloat,
              "moepack_cuda.qmatmul: x must be a float32 CUDA matrix [T, cols]");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor fq;
  const void* f = check_matrix(codes, scale, zero, bits, group, x.size(1), x.device(), rowq, &fq);
  at::Tensor keep;
  int64_t n;
  const int64_t* r = rows_ptr(rows, codes, &keep, &n);
  const int64_t cols = x.size(1), ldx = (cols + 31) / 32 * 32;
  at::Tensor xc = x.contiguous();
  if (ldx != cols) {  // a ragged row: the kernel reads whole blocks of 32 activations, zero past cols
    at::Tensor p = at::zeros({x.size(0), ldx}, x.options());
    p.narrow(1, 0, cols).copy_(xc);
    xc = p;
  }
  const at::Tensor c = aligned(codes), s = scale.contiguous(), z = zero.contiguous();
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  check_status(moepack_cuda_qmatmul(xc.data_ptr<float>(), (int)xc.size(0), (int)ldx, (int)cols,
                                    c.data_ptr<uint8_t>(), s.data_ptr(), z.data_ptr(), f, r, (int)n, (int)bits,
                                    (int)group, out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
               "qmatmul");
  return out;
}

at::Tensor qmatmul_t(const at::Tensor& h, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                     const c10::optional<at::Tensor>& rows, int64_t bits, int64_t group, int64_t cols,
                     const c10::optional<at::Tensor>& rowq) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && h.scalar_type() == at::kFloat,
              "moepack_cuda.qmatmul_t: h must be a float32 CUDA matrix [T, n]");
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor fq;
  const void* f = check_matrix(codes, scale, zero, bits, group, cols, h.device(), rowq, &fq);
  at::Tensor keep;
  int64_t n;
  const int64_t* r = rows_ptr(rows, codes, &keep, &n);
  TORCH_CHECK(h.size(1) == n, "moepack_cuda.qmatmul_t: h has ", h.size(1), " columns, expected ", n);
  const at::Tensor hc = h.contiguous(), c = aligned(codes), s = scale.contiguous(), z = zero.contiguous();
  at::Tensor out = at::zeros({h.size(0), cols}, h.options());
  check_status(moepack_cuda_qmatmul_t(hc.data_ptr<float>(), (int)hc.size(0), (int)n, c.data_ptr<uint8_t>(),
                                      s.data_ptr(), z.data_ptr(), f, r, (int)cols, (int)bits, (int)group,
                                      out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
               "qmatmul_t");
  return out;
}

at::Tensor qdequant(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                    const c10::optional<at::Tensor>& rows, int64_t bits, int64_t group, int64_t cols,
                    const c10::optional<at::Tensor>& rowq) {
  TORCH_CHECK(codes.is_cuda(), "moepack_cuda.qdequant: codes must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor fq;
  const void* f = check_matrix(codes, scale, zero, bits, group, cols, codes.device(), rowq, &fq);
  at::Tensor keep;
  int64_t n;
  const int64_t* r = rows_ptr(rows, codes, &keep, &n);
  const at::Tensor c = aligned(codes), s = scale.contiguous(), z = zero.contiguous();
  at::Tensor out = at::empty({n, cols}, codes.options().dtype(at::kFloat));
  check_status(moepack_cuda_qdequant(c.data_ptr<uint8_t>(), s.data_ptr(), z.data_ptr(), f, r, (int)n, (int)cols,
                                     (int)bits, (int)group, out.data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream().stream()),
               "qdequant");
  return out;
}

}  // namespace

TORCH_LIBRARY(moepack_cuda, m) {
  m.def(
      "qmatmul(Tensor x, Tensor codes, Tensor scale, Tensor zero, Tensor? rows, int bits, int group, "
      "Tensor? rowq=None) -> Tensor");
  m.def(
      "qmatmul_t(Tensor h, Tensor codes, Tensor scale, Tensor zero, Tensor? rows, int bits, int group, int cols, "
      "Tensor? rowq=None) -> Tensor");
  m.def(
      "qdequant(Tensor codes, Tensor scale, Tensor zero, Tensor? rows, int bits, int group, int cols, "
      "Tensor? rowq=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(moepack_cuda, CUDA, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("qmatmul_t", &qmatmul_t);
  m.impl("qdequant", &qdequant);
}
