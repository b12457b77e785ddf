// The dequantiser to bf16 on AVX-512 BW (the many-token path: a block of rows dequantised once per call,
// then torch's bf16 GEMM). Included by the isa_avx512*.cpp files after cpu_kernels.h, under their pragmas.
//
// A group's 2^B weights (q - zero) * scale are computed in fp32 exactly as the reference does, rounded to
// bf16 (nearest even) once, and held as 16-bit lanes of one zmm; each 32 codes then become 32 bf16 with
// one vpermw (_mm512_permutexvar_epi16), so the output is the reference decode rounded to bf16, bit for bit.
// q4 and q2 with whole groups and fp16 metadata take this path; q3 (codes straddling bytes), 8-bit
// metadata and ragged rows keep the shared kernel.
#pragma once

namespace {

// 16 floats -> the low 16 lanes of a zmm as bf16 (nearest even; the weights are finite).
inline __m512i bf16_table(__m512 w) {
  __m512i b = _mm512_castps_si512(w);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_castsi256_si512(_mm512_cvtepi32_epi16(b));
}

// The 16-bit lane index of each of 32 codes in the 4*B bytes at p (code i at bits B*i, little-endian).
template <int B>
inline __m512i code_lanes(const uint8_t* p);

template <>
inline __m512i code_lanes<4>(const uint8_t* p) {
  // byte k -> 32-bit lane k: low nibble (code 2k) in its low half, high nibble (code 2k+1) in its high half
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)),
                         _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0xF0)), 12));
}

template <>
inline __m512i code_lanes<2>(const uint8_t* p) {
  // byte k -> 64-bit lane k, its four 2-bit codes (4k .. 4k+3) spread to the four 16-bit lanes
  const __m512i v = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m512i s = _mm512_or_si512(_mm512_or_si512(v, _mm512_slli_epi64(v, 14)),
                                    _mm512_or_si512(_mm512_slli_epi64(v, 28), _mm512_slli_epi64(v, 42)));
  return _mm512_and_si512(s, _mm512_set1_epi64(0x0003000300030003LL));
}

template <int B>
void dequant_bf16_zmm(const moepack_cpu::QMat& m, const int64_t* rows, int64_t i0, int64_t i1, uint16_t* out) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = row_of(rows, i);
    const uint8_t* c = m.codes + r * m.row_bytes;
    const uint16_t* sc = m.scale + r * m.groups;
    const uint16_t* ze = m.zero + r * m.groups;
    uint16_t* o = out + i * m.cols;
    for (int64_t g = 0; g < m.groups; ++g) {
      const __m512 w = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(half_to_float(ze[g]))),
                                     _mm512_set1_ps(half_to_float(sc[g])));
      const __m512i table = bf16_table(w);
      for (int64_t col = g * m.group; col < (g + 1) * m.group; col += 32)
        _mm512_storeu_si512(o + col, _mm512_permutexvar_epi16(code_lanes<B>(c + col * B / 8), table));
    }
  }
}

void k_qdequant_bf16_zmm(const moepack_cpu::QMat& m, const int64_t* rows, int64_t i0, int64_t i1, uint16_t* out) {
  // 8-bit metadata (rowq) and a ragged last group take the shared kernel, which handles both
  if (m.rowq != nullptr || m.cols % m.group != 0)
    k_qdequant_bf16(m, rows, i0, i1, out);
  else if (m.bits == 4)
    dequant_bf16_zmm<4>(m, rows, i0, i1, out);
  else if (m.bits == 2)
    dequant_bf16_zmm<2>(m, rows, i0, i1, out);
  else
    k_qdequant_bf16(m, rows, i0, i1, out);
}

}  // namespace
