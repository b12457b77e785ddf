// CUDA kernels for moepack group quantisation (q2/q3/q4, group a multiple of 32): the same three ops as
// dequant_cpu.cpp. This file includes no torch header: it compiles alone with `nvcc -c`, and
// dequant_cuda_binding.cpp turns tensors into the raw pointers of the extern "C" launchers below.
//
// Layout (docs/format.md, "Codecs"): codes uint8 [rows, ceil(cols*b/8)], a little-endian bitstream per
// row; scale, zero fp16 [rows, ceil(cols/G)]; w = (q - zero) * scale in fp32 (the torch reference's
// rounding). Any cols (format version 2): the last group may be ragged and the last 32-code block (or
// 8-code octet) partial; such a block is read byte by byte up to the row's end, x is zero-padded to
// ldx = cols rounded up to 32 by the binding, and only columns < cols are written. Double-quantised
// metadata (recipe q{b}g{G}d): u8 gscale and gzero [rows, groups] under fp16 rowq [rows, 3] = (d_s, z_0,
// d_z), s = d_s * gscale, z = z_0 + d_z * gzero, computed per group as the kernels go (Meta::sz).
//
// Work units. 32 codes of b bits are exactly 4*b bytes and never straddle a group (G % 32 == 0):
//  * qmatmul (x @ W[rows].T): one warp per output row; lane l reads 32-code blocks l, l+32, ... of the
//    row as one 16-byte (q4), 8-byte (q2) or 3 x 4-byte (q3) load, so a warp reads a contiguous 512/256/
//    384-byte span per step (coalesced); partial sums meet in a shuffle reduction.
//  * qmatmul_t (h @ W[rows]): one thread per 8 columns (b bytes) and a slice of kRowsPerSlice rows;
//    consecutive threads read consecutive bytes of a row (coalesced), accumulate in registers and add
//    their slice's contribution to the output with atomicAdd (the output starts zeroed).
//  * qdequant: one thread per 8 columns of one row, writing two float4.
// When cols is a multiple of 32 (8 for the octet kernels), row strides are multiples of 4*b (b) bytes,
// so the aligned vector loads need only a 16-byte-aligned base (the binding guarantees it); otherwise the
// kernels load codes byte by byte.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = 256;
constexpr int kRowsPerSlice = 32;
constexpr int kMaxTokens = 8;

// 32 codes of B bits as B 32-bit words; code i is stream bits [i*B, i*B+B).
template <int B>
struct Block32 {
  uint32_t w[B];
  __device__ __forceinline__ void load(const uint8_t* p) {
    if (B == 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if (B == 2) {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      w[0] = v.x; w[1] = v.y;
    } else {
#pragma unroll
      for (int k = 0; k < B; ++k) w[k] = reinterpret_cast<const uint32_t*>(p)[k];
    }
  }
  // the same from a row whose bytes end `avail` (< 4*B) bytes after p, or at any alignment
  __device__ __forceinline__ void load_bytes(const uint8_t* p, int avail) {
#pragma unroll
    for (int k = 0; k < B; ++k) w[k] = 0u;
#pragma unroll
    for (int i = 0; i < 4 * B; ++i)
      if (i < avail) w[i >> 2] |= (uint32_t)p[i] << (8 * (i & 3));
  }
  __device__ __forceinline__ uint32_t code(int i) const {  // i is a compile-time constant after unrolling
    const int bit = i * B, word = bit >> 5, off = bit & 31;
    uint32_t v = w[word] >> off;
    if (off + B > 32) v |= w[word + 1] << (32 - off);
    return v & ((1u << B) - 1u);
  }
};

// 8 codes of B bits starting at byte p (B bytes, any alignment) as one integer.
template <int B>
__device__ __forceinline__ uint32_t load_octet(const uint8_t* p) {
  if (B == 4) return *reinterpret_cast<const uint32_t*>(p);  // 4-byte aligned: octet index * 4
  if (B == 2) return *reinterpret_cast<const uint16_t*>(p);  // 2-byte aligned
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16);
}

// The same for a ragged row: byte by byte, at most `avail` bytes (the row's end).
template <int B>
__device__ __forceinline__ uint32_t load_octet_bytes(const uint8_t* p, int64_t avail) {
  uint32_t v = 0u;
#pragma unroll
  for (int i = 0; i < B; ++i)
    if (i < avail) v |= (uint32_t)p[i] << (8 * i);
  return v;
}

__device__ __forceinline__ int64_t row_bytes_of(int cols, int B) { return ((int64_t)cols * B + 7) / 8; }

// A matrix's group metadata: fp16 scale and zero (rowq == nullptr), or u8 codes under per-row factors.
struct Meta {
  const __half* scale;
  const __half* zero;
  const uint8_t* gscale;
  const uint8_t* gzero;
  const __half* rowq;
  int groups;
  // scale and zero of group g of row r; the products are exact in fp32, so a fused multiply-add rounds as
  // the reference's multiply-then-add
  __device__ __forceinline__ void sz(int64_t r, int g, float& s, float& z) const {
    const int64_t k = r * groups + g;
    if (rowq == nullptr) {
      s = __half2float(scale[k]);
      z = __half2float(zero[k]);
      return;
    }
    const __half* f = rowq + r * 3;
    s = __half2float(f[0]) * (float)gscale[k];
    z = __half2float(f[1]) + __half2float(f[2]) * (float)gzero[k];
  }
  Meta rows_from(int64_t i0) const {  // the metadata of rows i0, i0 + 1, ...
    const int64_t k = i0 * groups;
    if (rowq == nullptr) return Meta{scale + k, zero + k, nullptr, nullptr, nullptr, groups};
    return Meta{nullptr, nullptr, gscale + k, gzero + k, rowq + i0 * 3, groups};
  }
};

Meta make_meta(const void* scale, const void* zero, const void* rowq, int cols, int group) {
  const int groups = (cols + group - 1) / group;
  if (rowq == nullptr)
    return Meta{static_cast<const __half*>(scale), static_cast<const __half*>(zero), nullptr, nullptr, nullptr, groups};
  return Meta{nullptr, nullptr, static_cast<const uint8_t*>(scale), static_cast<const uint8_t*>(zero),
              static_cast<const __half*>(rowq), groups};
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int B, int NT>
__global__ void qmatmul_kernel(const float* __restrict__ x, int ldx, int cols, const uint8_t* __restrict__ codes,
                               Meta meta, const int64_t* __restrict__ rows, int n, int group, float* __restrict__ out,
                               int ldo) {
  const int warp = blockIdx.x * kWarpsPerBlock + (threadIdx.x / kWarp);
  const int lane = threadIdx.x % kWarp;
  if (warp >= n) return;
  const int64_t r = rows ? rows[warp] : warp;
  const int nblocks = (cols + 31) / 32;
  const int64_t row_bytes = row_bytes_of(cols, B);
  const bool whole = cols % 32 == 0;  // aligned rows of whole blocks: vector loads
  const uint8_t* crow = codes + r * row_bytes;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  for (int blk = lane; blk < nblocks; blk += kWarp) {
    Block32<B> q;
    if (whole)
      q.load(crow + blk * 4 * B);
    else
      q.load_bytes(crow + blk * 4 * B, (int)min((int64_t)(4 * B), row_bytes - (int64_t)blk * 4 * B));
    const int g = blk * 32 / group;
    float s, z;
    meta.sz(r, g, s, z);
    const float* xb = x + blk * 32;
#pragma unroll
    for (int i4 = 0; i4 < 8; ++i4) {
      float w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) w[k] = ((float)q.code(i4 * 4 + k) - z) * s;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const float4 xv = __ldg(reinterpret_cast<const float4*>(xb + (int64_t)t * ldx) + i4);  // 0 past cols
        acc[t] = fmaf(w[0], xv.x, acc[t]);
        acc[t] = fmaf(w[1], xv.y, acc[t]);
        acc[t] = fmaf(w[2], xv.z, acc[t]);
        acc[t] = fmaf(w[3], xv.w, acc[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0) out[(int64_t)t * ldo + warp] = v;
  }
}

template <int B, int NT>
__global__ void qmatmul_t_kernel(const float* __restrict__ h, int ldh, const uint8_t* __restrict__ codes,
                                 Meta meta, const int64_t* __restrict__ rows, int n, int cols, int group,
                                 float* __restrict__ out) {
  const int oct = blockIdx.x * blockDim.x + threadIdx.x;  // 8 columns [8*oct, 8*oct+8)
  if (oct >= (cols + 7) / 8) return;
  const int i0 = blockIdx.y * kRowsPerSlice, i1 = min(n, i0 + kRowsPerSlice);
  const int g = oct * 8 / group;
  const int64_t row_bytes = row_bytes_of(cols, B);
  const bool whole = cols % 8 == 0;  // aligned octets; else byte loads up to the row's end
  const int ncol = min(8, cols - oct * 8);
  float acc[NT][8];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[t][j] = 0.f;
  for (int i = i0; i < i1; ++i) {
    const int64_t r = rows ? rows[i] : i;
    const uint8_t* p = codes + r * row_bytes + (int64_t)oct * B;
    const uint32_t q = whole ? load_octet<B>(p) : load_octet_bytes<B>(p, row_bytes - (int64_t)oct * B);
    float s, z;
    meta.sz(r, g, s, z);
    float hv[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) hv[t] = __ldg(h + (int64_t)t * ldh + i);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float w = ((float)((q >> (j * B)) & ((1u << B) - 1u)) - z) * s;
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[t][j] = fmaf(hv[t], w, acc[t][j]);
    }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < ncol) atomicAdd(out + (int64_t)t * cols + oct * 8 + j, acc[t][j]);
}

template <int B>
__global__ void qdequant_kernel(const uint8_t* __restrict__ codes, Meta meta, const int64_t* __restrict__ rows,
                                int cols,
                                int group, float* __restrict__ out) {
  const int oct = blockIdx.x * blockDim.x + threadIdx.x;
  if (oct >= (cols + 7) / 8) return;
  const int i = blockIdx.y;
  const int64_t r = rows ? rows[i] : i;
  const int g = oct * 8 / group;
  const int64_t row_bytes = row_bytes_of(cols, B);
  const uint8_t* p = codes + r * row_bytes + (int64_t)oct * B;
  const uint32_t q = cols % 8 == 0 ? load_octet<B>(p) : load_octet_bytes<B>(p, row_bytes - (int64_t)oct * B);
  float s, z;
  meta.sz(r, g, s, z);
  float w[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) w[j] = ((float)((q >> (j * B)) & ((1u << B) - 1u)) - z) * s;
  if (cols % 8 == 0) {
    float4* o = reinterpret_cast<float4*>(out + (int64_t)i * cols + oct * 8);
    o[0] = make_float4(w[0], w[1], w[2], w[3]);
    o[1] = make_float4(w[4], w[5], w[6], w[7]);
    return;
  }
  float* o = out + (int64_t)i * cols + oct * 8;  // a ragged row: unaligned, maybe fewer than 8 columns
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < cols - oct * 8) o[j] = w[j];
}

template <int B, int NT>
void launch_matmul(const float* x, int ldx, int cols, const uint8_t* codes, Meta mt,
                   const int64_t* rows, int n, int group, float* out, int ldo, cudaStream_t stream) {
  const dim3 grid((n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  qmatmul_kernel<B, NT><<<grid, kWarp * kWarpsPerBlock, 0, stream>>>(x, ldx, cols, codes, mt, rows, n, group, out,
                                                                      ldo);
}

template <int B>
void matmul_tokens(const float* x, int T, int ldx, int cols, const uint8_t* codes, Meta mt, const int64_t* rows,
                   int n, int group, float* out, cudaStream_t stream) {
  for (int t = 0; t < T; t += kMaxTokens) {
    const float* xt = x + (int64_t)t * ldx;
    float* ot = out + (int64_t)t * n;
    switch (T - t >= kMaxTokens ? kMaxTokens : T - t) {
      case 1: launch_matmul<B, 1>(xt, ldx, cols, codes, mt, rows, n, group, ot, n, stream); break;
      case 2: launch_matmul<B, 2>(xt, ldx, cols, codes, mt, rows, n, group, ot, n, stream); break;
      case 3: launch_matmul<B, 3>(xt, ldx, cols, codes, mt, rows, n, group, ot, n, stream); break;
      case 4: launch_matmul<B, 4>(xt, ldx, cols, codes, mt, rows, n, group, ot, n, stream); break;
      case 5: launch_matmul<B, 5>(xt, ldx, cols, codes, mt, rows, n, group, ot, n, stream); break;
      case 6: launch_matmul<B, 6>(xt, ldx, cols, codes, mt, rows, n, group, ot, n, stream); break;
      case 7: launch_matmul<B, 7>(xt, ldx, cols, codes, mt, rows, n, group, ot, n, stream); break;
      default: launch_matmul<B, 8>(xt, ldx, cols, codes, mt, rows, n, group, ot, n, stream); break;
    }
  }
}

template <int B, int NT>
void launch_matmul_t(const float* h, int ldh, const uint8_t* codes, Meta mt,
                     const int64_t* rows, int n, int cols, int group, float* out, cudaStream_t stream) {
  const dim3 grid(((cols + 7) / 8 + kThreads - 1) / kThreads, (n + kRowsPerSlice - 1) / kRowsPerSlice);
  qmatmul_t_kernel<B, NT><<<grid, kThreads, 0, stream>>>(h, ldh, codes, mt, rows, n, cols, group, out);
}

template <int B>
void matmul_t_tokens(const float* h, int T, const uint8_t* codes, Meta mt,
                     const int64_t* rows, int n, int cols, int group, float* out, cudaStream_t stream) {
  for (int t = 0; t < T; t += kMaxTokens) {
    const float* ht = h + (int64_t)t * n;
    float* ot = out + (int64_t)t * cols;
    switch (T - t >= kMaxTokens ? kMaxTokens : T - t) {
      case 1: launch_matmul_t<B, 1>(ht, n, codes, mt, rows, n, cols, group, ot, stream); break;
      case 2: launch_matmul_t<B, 2>(ht, n, codes, mt, rows, n, cols, group, ot, stream); break;
      case 3: launch_matmul_t<B, 3>(ht, n, codes, mt, rows, n, cols, group, ot, stream); break;
      case 4: launch_matmul_t<B, 4>(ht, n, codes, mt, rows, n, cols, group, ot, stream); break;
      case 5: launch_matmul_t<B, 5>(ht, n, codes, mt, rows, n, cols, group, ot, stream); break;
      case 6: launch_matmul_t<B, 6>(ht, n, codes, mt, rows, n, cols, group, ot, stream); break;
      case 7: launch_matmul_t<B, 7>(ht, n, codes, mt, rows, n, cols, group, ot, stream); break;
      default: launch_matmul_t<B, 8>(ht, n, codes, mt, rows, n, cols, group, ot, stream); break;
    }
  }
}

bool valid(int bits, int group, int cols) {
  return (bits == 2 || bits == 3 || bits == 4) && group > 0 && group % 32 == 0 && cols > 0;
}

}  // namespace

// Launchers: raw device pointers, scale/zero as fp16 bits (or, with rowq, u8 codes under its fp16 [rows, 3]
// factors), rows and rowq nullable; return a cudaError_t
// (cudaErrorInvalidValue for bad bits/group/cols). out of qmatmul_t must be zero-filled by the caller.
// x of qmatmul has row stride ldx: cols rounded up to 32, zero past cols.
extern "C" int moepack_cuda_qmatmul(const float* x, int T, int ldx, int cols, const uint8_t* codes,
                                    const void* scale, const void* zero, const void* rowq, const int64_t* rows,
                                    int n, int bits, int group, float* out, cudaStream_t stream) {
  if (!valid(bits, group, cols) || ldx != (cols + 31) / 32 * 32) return (int)cudaErrorInvalidValue;
  if (T <= 0 || n <= 0) return (int)cudaSuccess;
  const Meta mt = make_meta(scale, zero, rowq, cols, group);
  if (bits == 2) matmul_tokens<2>(x, T, ldx, cols, codes, mt, rows, n, group, out, stream);
  else if (bits == 3) matmul_tokens<3>(x, T, ldx, cols, codes, mt, rows, n, group, out, stream);
  else matmul_tokens<4>(x, T, ldx, cols, codes, mt, rows, n, group, out, stream);
  return (int)cudaGetLastError();
}

extern "C" int moepack_cuda_qmatmul_t(const float* h, int T, int n, const uint8_t* codes, const void* scale,
                                      const void* zero, const void* rowq, const int64_t* rows, int cols, int bits,
                                      int group, float* out, cudaStream_t stream) {
  if (!valid(bits, group, cols)) return (int)cudaErrorInvalidValue;
  if (T <= 0 || n <= 0) return (int)cudaSuccess;
  const Meta mt = make_meta(scale, zero, rowq, cols, group);
  if (bits == 2) matmul_t_tokens<2>(h, T, codes, mt, rows, n, cols, group, out, stream);
  else if (bits == 3) matmul_t_tokens<3>(h, T, codes, mt, rows, n, cols, group, out, stream);
  else matmul_t_tokens<4>(h, T, codes, mt, rows, n, cols, group, out, stream);
  return (int)cudaGetLastError();
}

extern "C" int moepack_cuda_qdequant(const uint8_t* codes, const void* scale, const void* zero, const void* rowq,
                                     const int64_t* rows, int n, int cols, int bits, int group, float* out,
                                     cudaStream_t stream) {
  if (!valid(bits, group, cols)) return (int)cudaErrorInvalidValue;
  if (n <= 0) return (int)cudaSuccess;
  const Meta mt = make_meta(scale, zero, rowq, cols, group);
  constexpr int kMaxGridY = 65535;
  for (int i0 = 0; i0 < n; i0 += kMaxGridY) {  // one launch per slice of rows (grid.y is limited)
    const int m = n - i0 < kMaxGridY ? n - i0 : kMaxGridY;
    const dim3 grid(((cols + 7) / 8 + kThreads - 1) / kThreads, m);
    const int64_t* r = rows ? rows + i0 : nullptr;
    const int64_t row_bytes = ((int64_t)cols * bits + 7) / 8;
    const uint8_t* c = rows ? codes : codes + (int64_t)i0 * row_bytes;
    const Meta mg = rows ? mt : mt.rows_from(i0);
    float* o = out + (int64_t)i0 * cols;
    if (bits == 2) qdequant_kernel<2><<<grid, kThreads, 0, stream>>>(c, mg, r, cols, group, o);
    else if (bits == 3) qdequant_kernel<3><<<grid, kThreads, 0, stream>>>(c, mg, r, cols, group, o);
    else qdequant_kernel<4><<<grid, kThreads, 0, stream>>>(c, mg, r, cols, group, o);
  }
  return (int)cudaGetLastError();
}
