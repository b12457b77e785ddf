// The portable kernels: plain C++ (the compiler may still vectorise them for the baseline ISA).
#define MOEPACK_SIMD 0
#include "cpu_kernels.h"

namespace moepack_cpu {
const Table* table_generic() {
  static const Table t{"generic", 0, k_qmatmul, k_pmatmul, k_qmatmul_t, k_pmatmul_t, k_qdequant, k_qdequant_bf16,
                       nullptr, nullptr};
  return &t;
}
}  // namespace moepack_cpu
