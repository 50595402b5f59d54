// Lossless integer-code copies of fp32 weights for panel_linear (included by panel_linear.cpp).
//
// A model loaded from a quantized checkpoint (a GGUF file, as the embedded SmolLM2) holds fp32 weights
// whose values are block codes: every 32 values along K are d * q + m with q a 4-bit code (GGUF Q4_1)
// or d * q with q an 8-bit code (Q8_0), d and m per block. Streaming them as fp32 reads 32 bits where
// 4-8 carry the information. If every block of a weight reproduces its fp32 values bit for bit from
// such codes, the panel copy keeps the codes instead (6 or 9 bits a weight with fp32 d and m) and the
// kernel rebuilds each weight exactly as the check did (the product rounded to fp32, then the sum) before
// the same FMA as the fp32 kernel: the results are the fp32 kernel's, bit for bit. Weights with any
// other values (every ordinary fp32 model) fail the first block's check and keep the fp32 copy.
//
// Layout per panel of P columns, per block of KB k-steps: d [P] fp32, m [P] fp32 (4-bit codes only),
// then KB steps of codes: P / 2 bytes (column j's code in the low nibble of byte j, column j + P / 2's
// in its high nibble) or P signed bytes. AVX-512 builds only (P = 32: one 16-byte load widens to both
// vectors of a step).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace panel_codes {

enum Format : int { kPlain = 0, kAffine4 = 1, kScale8 = 2 };
constexpr int64_t KB = 32;  // codes per block along K, GGUF's block size

inline bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// d * q + m with the product rounded before the sum, as numpy's dequantization (and the kernel) does
// it: the volatile keeps -ffp-contract from fusing them into one FMA (one rounding: other bits).
inline float affine(float d, float q, float m) {
  volatile float t = d * q;
  return t + m;
}

// Candidate block scales near an estimate: the checkpoint stored d as fp16, so its fp16 rounding and
// the fp16 neighbours come first, then the fp32 estimate itself.
inline int scale_candidates(float est, float* out) {
  const c10::Half h(est);
  int n = 0;
  for (int delta : {0, -1, 1, -2, 2}) {
    c10::Half c;
    c.x = static_cast<uint16_t>(h.x + delta);
    const float f = static_cast<float>(c);
    if (std::isfinite(f) && f > 0.f) out[n++] = f;
  }
  out[n++] = est;
  return n;
}

// 32 values v (stride s) as d * q + m, q in [0, 15]: m is the block minimum (code 0), d from the maximum.
inline bool fit_affine4(const float* v, int64_t s, float& d, float& m, uint8_t* q) {
  float lo = v[0], hi = v[0];
  for (int64_t i = 1; i < KB; ++i) lo = std::min(lo, v[i * s]), hi = std::max(hi, v[i * s]);
  m = lo;
  float cand[6];
  const int n = hi > lo ? scale_candidates((hi - lo) / 15.f, cand) : (cand[0] = 0.f, 1);
  for (int c = 0; c < n; ++c) {
    bool ok = true;
    for (int64_t i = 0; i < KB && ok; ++i) {
      const float code = cand[c] > 0.f ? std::nearbyint((v[i * s] - lo) / cand[c]) : 0.f;
      ok = code >= 0.f && code <= 15.f && same_bits(affine(cand[c], code, lo), v[i * s]);
      q[i] = static_cast<uint8_t>(code);
    }
    if (ok) return d = cand[c], true;
  }
  return false;
}

// 32 values v (stride s) as d * q, q in [-128, 127]: d from the largest magnitude (code +-127).
inline bool fit_scale8(const float* v, int64_t s, float& d, int8_t* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < KB; ++i) amax = std::max(amax, std::fabs(v[i * s]));
  float cand[6];
  const int n = amax > 0.f ? scale_candidates(amax / 127.f, cand) : (cand[0] = 0.f, 1);
  for (int c = 0; c < n; ++c) {
    bool ok = true;
    for (int64_t i = 0; i < KB && ok; ++i) {
      const float code = cand[c] > 0.f ? std::nearbyint(v[i * s] / cand[c]) : 0.f;
      ok = code >= -128.f && code <= 127.f && same_bits(cand[c] * code, v[i * s]);
      q[i] = static_cast<uint8_t>(static_cast<int8_t>(code));
    }
    if (ok) return d = cand[c], true;
  }
  return false;
}

constexpr int64_t step_bytes(Format f, int64_t P) { return f == kAffine4 ? P / 2 : P; }
constexpr int64_t head_bytes(Format f, int64_t P) { return (f == kAffine4 ? 2 : 1) * P * 4; }
constexpr int64_t block_bytes(Format f, int64_t P) { return head_bytes(f, P) + KB * step_bytes(f, P); }

// The coded copy of w [N, K] fp32 in format f, or an undefined tensor if some block does not fit.
inline at::Tensor encode(const at::Tensor& w, Format f, int64_t P) {
  const int64_t N = w.size(0), K = w.size(1), panels = (N + P - 1) / P, blocks = K / KB;
  const int64_t per_panel = blocks * block_bytes(f, P);
  at::Tensor out = at::zeros({panels, per_panel}, w.options().dtype(at::kByte));  // padding columns: 0
  const float* wp = w.data_ptr<float>();
  const int64_t s0 = w.stride(0), s1 = w.stride(1);
  uint8_t* op = out.data_ptr<uint8_t>();
  std::atomic<bool> fits{true};
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    uint8_t q[KB];
    for (int64_t p = p0; p < p1 && fits.load(std::memory_order_relaxed); ++p)
      for (int64_t kb = 0; kb < blocks; ++kb) {
        uint8_t* blk = op + p * per_panel + kb * block_bytes(f, P);
        float* d = reinterpret_cast<float*>(blk);
        float* m = d + P;
        uint8_t* codes = blk + head_bytes(f, P);
        for (int64_t j = 0; j < P && p * P + j < N; ++j) {
          const float* v = wp + (p * P + j) * s0 + kb * KB * s1;
          const bool ok = f == kAffine4 ? fit_affine4(v, s1, d[j], m[j], q)
                                        : fit_scale8(v, s1, d[j], reinterpret_cast<int8_t*>(q));
          if (!ok) return fits.store(false);
          for (int64_t i = 0; i < KB; ++i) {
            uint8_t* c = codes + i * step_bytes(f, P);
            if (f == kScale8) c[j] = q[i];
            else c[j % (P / 2)] |= static_cast<uint8_t>(q[i] << (j < P / 2 ? 0 : 4));
          }
        }
      }
  });
  return fits ? out : at::Tensor();
}

#if defined(CPU_CAPABILITY_AVX512)
// The two fp32 weight vectors of one k-step, rebuilt from its codes and the block's d and m.
template <Format F>
inline void weights(const uint8_t* c, const __m512* d, const __m512* m, __m512& w0, __m512& w1) {
  if constexpr (F == kAffine4) {
    const __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    __m512 t0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(i, _mm512_set1_epi32(15))), d[0]);
    __m512 t1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(i, 4)), d[1]);
    asm("" : "+v"(t0), "+v"(t1));  // round the products before the sums, as encode() checked
    w0 = _mm512_add_ps(t0, m[0]);
    w1 = _mm512_add_ps(t1, m[1]);
  } else {
    const __m128i* q = reinterpret_cast<const __m128i*>(c);
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), d[0]);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), d[1]);
  }
}

// Calls f(k, w0, w1) for every k-step of one coded panel (P = 32), in k order.
template <Format F, class Fn>
inline void for_each_step(const uint8_t* wp, int64_t K, Fn&& f) {
  constexpr int64_t P = 32, step = step_bytes(F, P), head = head_bytes(F, P), blk = block_bytes(F, P);
  for (int64_t kb = 0; kb < K / KB; ++kb) {
    const uint8_t* b = wp + kb * blk;
    const float* dm = reinterpret_cast<const float*>(b);
    const __m512 d[2] = {_mm512_loadu_ps(dm), _mm512_loadu_ps(dm + 16)};
    __m512 m[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    if constexpr (F == kAffine4) m[0] = _mm512_loadu_ps(dm + 32), m[1] = _mm512_loadu_ps(dm + 48);
    const uint8_t* c = b + head;
    for (int64_t kk = 0; kk < KB; ++kk, c += step) {
      // two blocks ahead, walking the stream evenly (headers included): ~1.5-2 KB, as the fp32 kernel
      __builtin_prefetch(b + 2 * blk + kk * (blk / KB), 0, 0);
      __m512 w0, w1;
      weights<F>(c, d, m, w0, w1);
      f(kb * KB + kk, w0, w1);
    }
  }
}
#endif

}  // namespace panel_codes
