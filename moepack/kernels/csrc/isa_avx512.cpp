// AVX-512 F/BW/VL/DQ (Skylake-X): the integer GEMV on zmm with vpmaddubsw.
// Compiled with a target pragma, so one build serves every x86-64 CPU; the glue calls this table only
// when the CPU has these instructions (cpu_table.h says why nothing here may use library templates).
#include "cpu_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#include <immintrin.h>
#define MOEPACK_SIMD 1
#define MOEPACK_Q8_VEC 64
#define MOEPACK_VNNI 0
#include "cpu_kernels.h"
#include "cpu_gemv_q8.h"
#include "cpu_matmul_t.h"
#include "cpu_dequant_zmm.h"

namespace moepack_cpu {
const Table* table_avx512() {
  static const Table t{"avx512", MOEPACK_Q8_VEC, k_qmatmul, k_pmatmul, k_qmatmul_t_fast, k_pmatmul_t, k_qdequant,
                       k_qdequant_bf16_zmm, k_q8_prepare, k_q8_matmul};
  return &t;
}
}  // namespace moepack_cpu
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
namespace moepack_cpu {
const Table* table_avx512() { return nullptr; }
}  // namespace moepack_cpu
#endif
