// The interface between the ATen glue (dequant_cpu.cpp) and the per-instruction-set kernels.
//
// Each isa_*.cpp compiles the same kernel bodies (cpu_kernels.h, cpu_gemv_q8.h) under its own target
// pragma and returns a Table of plain function pointers; the glue picks the best table the CPU supports
// at run time (or the one MOEPACK_CPU_ISA / set_isa names). Nothing here includes ATen or the standard
// library's templates: a template instantiated under an AVX-512 pragma and merged by the linker with
// the generic one could otherwise run AVX-512 code on a CPU without it.
#pragma once
#include <cstdint>

namespace moepack_cpu {

// A group-quantised matrix: codes uint8 [rows, row_bytes] (little-endian bitstream of `bits`-bit codes,
// row_bytes = ceil(cols * bits / 8)), scale and zero fp16 [rows, groups] with groups = ceil(cols / group)
// (any cols: the last group may be ragged); w = (q - zero) * scale. The activations x handed to qmatmul,
// q8_prepare and q8_matmul have ldx >= cols rounded up to 32, zero past cols (the glue pads them).
// With double-quantised metadata (recipe q{b}g{G}d, rowq != nullptr) scale and zero are null and group j
// of row r has s = d_s * gscale[r, j], z = z_0 + d_z * gzero[r, j], rowq[r] = (d_s, z_0, d_z) fp16
// (RowMeta in cpu_kernels.h; both products are exact in fp32).
struct QMat {
  const uint8_t* codes;
  const uint16_t* scale;
  const uint16_t* zero;
  int64_t row_bytes, groups, group, cols;
  int bits;
  const uint8_t* gscale = nullptr;  // u8 [rows, groups]
  const uint8_t* gzero = nullptr;   // u8 [rows, groups]
  const uint16_t* rowq = nullptr;   // fp16 [rows, 3]
};

// A bf16 (bf16 = true) or fp16 matrix with row stride ld elements and cols a multiple of 32.
struct WMat {
  const uint16_t* data;
  int64_t ld, groups, cols;  // groups = cols / 32
  bool bf16;
};

// Activations quantised to int8 for the integer GEMV (prepared once per call by q8_prepare, cpu_q8.h):
// per token, blocks of 32 values share one scale d (xq * d ~ x); the codes of a `vec`-byte vector of
// packed weights pair with the activations reordered to match (see cpu_gemv_q8.h).
struct Q8X {
  const int8_t* q;       // [T][chunks * chunk_codes]
  const float* d;        // [T][chunks * lanes]: the block scale of each 32-bit lane of a chunk
  const float* c;        // [T][groups]: sum over the group of xq * d (for the zero-point term)
  const int32_t* gidx;   // [chunks * lanes]: group of each lane, relative to gfirst
  const int32_t* gfirst; // [chunks]: first group of each chunk
  int64_t chunks, chunk_codes, lanes;
  int64_t plane;         // 0: one int8 plane; else the offset from q to the residual plane (x128)
};

struct Table {
  const char* name;
  int q8_vec;  // bytes per vector of the integer GEMV (0: this ISA has none)
  // out[t*ldo + i] = x[t] . W[rows[i]] for nt <= 4 tokens and i in [i0, i1)
  void (*qmatmul)(const QMat&, const float* x, int64_t ldx, int nt, const int64_t* rows, int64_t i0,
                  int64_t i1, float* out, int64_t ldo);
  void (*pmatmul)(const WMat&, const float* x, int64_t ldx, int nt, const int64_t* rows, int64_t i0,
                  int64_t i1, float* out, int64_t ldo);
  // acc[t*ldacc + c - g0*unit] += sum_i h[t*n + i] * W[rows[i], c] for units [g0, g1), nt <= 8 tokens
  void (*qmatmul_t)(const QMat&, const float* h, int64_t nt, const int64_t* rows, int64_t n, int64_t g0,
                    int64_t g1, float* acc, int64_t ldacc);
  void (*pmatmul_t)(const WMat&, const float* h, int64_t nt, const int64_t* rows, int64_t n, int64_t g0,
                    int64_t g1, float* acc, int64_t ldacc);
  // W[rows[i]] for i in [i0, i1) into out + i * cols, as float32 or bf16 (nearest even)
  void (*qdequant)(const QMat&, const int64_t* rows, int64_t i0, int64_t i1, float* out);
  void (*qdequant_bf16)(const QMat&, const int64_t* rows, int64_t i0, int64_t i1, uint16_t* out);
  // out[t*ldo + i] ~ x[t] . W[rows[i]] with int8 activations (bits 2 and 4); ws: 4 * (groups + 32)
  // zeroed floats
  void (*q8_prepare)(const QMat&, const float* x, int64_t ldx, int64_t T, Q8X& a, int8_t* q, float* d, float* c,
                     int32_t* gidx, int32_t* gfirst, uint8_t* scratch);
  void (*q8_matmul)(const QMat&, const Q8X&, int nt, const int64_t* rows, int64_t i0, int64_t i1, float* out,
                    int64_t ldo, float* ws);
};

const Table* table_generic();
const Table* table_avx2();          // nullptr when not compiled for x86-64
const Table* table_avx512();
const Table* table_avx512_vnni();

}  // namespace moepack_cpu
