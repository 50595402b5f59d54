// y = x @ w.T (+ b) for a few rows, reading a panel-packed copy of w: the decode GEMMs on CPU.
//
// small_linear.cpp reads w as the model holds it, row-major [N, K]: each tile is 2-4 weight rows read
// side by side, i.e. 2-4 short streams (one K-float row each) plus software prefetch of the next
// tile. On the Zen 4 EPYC that streams 15-23 GB/s of a 34 GB/s read bandwidth, and the M = 8 tiles are
// the slowest. Here w is packed once into panels of P = 2 vectors of output columns, k-major:
// wp[j, k, :] = w[j*P : (j+1)*P, k]. A thread then reads one contiguous stream (its run of panels),
// which the hardware prefetcher follows at full speed, and each loaded weight vector feeds every input
// row (x[m, k] broadcast): R x 2 accumulators, no horizontal sums. SmolLM2's decode GEMMs, weights
// cold: M = 1 / 4 / 8 in 22.5 / 21.1 / 19.8 ms against small_linear's 25.3 / 28.3 / 31.6
// (bench/small_linear.py).
//
// fp32 weights whose values are block codes (a GGUF checkpoint dequantized to float, as the embedded
// SmolLM2: Q4_1 layers, a Q8_0 LM head) keep the codes instead, 6 or 9 bits a weight, rebuilt exactly
// as read (panel_codes.h): the same results, bit for bit, from a fifth to a third of the bytes.
//
// bf16 x and w (a bf16 model) keep a bf16 copy, accumulate in fp32 and round each result once; on CPUs
// with AVX512-BF16 the copy is packed as k-pairs for vdpbf16ps (panel_pairs), elsewhere widened as read.
//
// The packed copy is made on the first call with a weight and kept in a cache checked against the
// weight's storage (held weakly: while an entry exists no other storage can take its identity),
// offset, geometry and the version counters of the tensors it was handed, so a freed, replaced or
// in-place-written weight is packed again and entries of freed weights are dropped. Inference tensors
// have no version counter: for them the op computes F.linear's product instead of keeping a copy it
// could not keep in sync.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "panel_codes.h"
#if defined(ZY_DPBF16)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();
constexpr int64_t P = 2 * V;     // output columns per panel
constexpr int64_t AHEAD = 16;    // k-steps prefetched ahead (P floats each): ~2 KB of the stream
// Input rows per sweep over a panel. 16 rows keep 32 accumulators, more than the 32 registers hold
// with the weights: a few spill to L1, which costs less than a second sweep. A second sweep reads the
// panel again from L2 after the first streamed it from memory, so its FMAs run with the memory idle;
// in one sweep they run while the stream is in flight. SmolLM2's decode GEMMs in model order, weights
// cold, this kernel against the 8-row one built beside it and alternated (2-core EPYC, RESULTS.md
// notes of 2026-11-29 16:4x-17:4x): M = 12 / 16 in 21.6 / 24.5 ms against 28.8 / 29.3, M = 1 / 8 /
// 32-256 unchanged to 4% faster. The bf16 pair kernel keeps 8 rows a sweep (it is compute-bound by M = 8 already).
constexpr int64_t ROWS = 16;
constexpr int64_t PAIR_ROWS = 8;

at::Tensor pack(const at::Tensor& w, at::ScalarType dtype) {
  const int64_t N = w.size(0), K = w.size(1), panels = (N + P - 1) / P;
#if defined(ZY_DPBF16)
  if (dtype == at::kBFloat16) {  // k-pairs side by side, [panels, K/2, P, 2]: one vdpbf16ps operand per step
    const int64_t K2 = (K + 1) / 2;
    at::Tensor padded = at::zeros({panels * P, 2 * K2}, w.options().dtype(dtype));
    padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
    return padded.view({panels, P, K2, 2}).permute({0, 2, 1, 3}).contiguous();
  }
#endif
  at::Tensor padded = at::zeros({panels * P, K}, w.options().dtype(dtype));
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({panels, P, K}).transpose(1, 2).contiguous();  // [panels, K, P]
}

// One k-step of a panel: P weights as two fp32 vectors (a half-precision copy widens exactly).
inline void load_panel(const float* p, Vec& w0, Vec& w1) {
  w0 = Vec::loadu(p);
  w1 = Vec::loadu(p + V);
}
inline void load_panel(const at::Half* p, Vec& w0, Vec& w1) {
  std::tie(w0, w1) = at::vec::convert_to_float<at::Half>(at::vec::Vectorized<at::Half>::loadu(p));
}
inline void load_panel(const at::BFloat16* p, Vec& w0, Vec& w1) {
  std::tie(w0, w1) = at::vec::convert_to_float<at::BFloat16>(at::vec::Vectorized<at::BFloat16>::loadu(p));
}

// Adds the bias to R rows of accumulators (the panel's cols <= P live columns) and stores them as X.
template <typename X, int R>
inline void store_rows(Vec* acc0, Vec* acc1, const float* b, X* y, int64_t ldy, int64_t cols) {
  const int64_t lo = std::min<int64_t>(V, cols), hi = cols - lo;
  for (int r = 0; r < R; ++r) {
    if (b) {
      acc0[r] = acc0[r] + Vec::loadu(b, lo);
      if (hi > 0) acc1[r] = acc1[r] + Vec::loadu(b + V, hi);
    }
    if constexpr (std::is_same_v<X, float>) {
      acc0[r].store(y + r * ldy, lo);
      if (hi > 0) acc1[r].store(y + r * ldy + V, hi);
    } else {  // both vectors rounded into one bf16 vector of P lanes
      at::vec::convert_from_float<X>(acc0[r], acc1[r]).store(y + r * ldy, cols);
    }
  }
}

// R input rows of type X (fp32, or bf16 widened as read) against one panel (cols <= P live output columns)
// of weights of type W; the results are stored as X.
template <typename W, typename X, int R>
inline void panel(const X* x, int64_t ldx, const W* wp, int64_t K, const float* b, X* y, int64_t ldy,
                  int64_t cols) {
  Vec acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(wp + (k + AHEAD) * P, 0, 0);  // a hint: reads past the panel cannot fault
    if (sizeof(W) == 4) __builtin_prefetch(wp + (k + AHEAD) * P + V, 0, 0);  // P halves are one line
    Vec w0, w1;
    load_panel(wp + k * P, w0, w1);
    for (int r = 0; r < R; ++r) {
      const Vec xb(static_cast<float>(x[r * ldx + k]));
      acc0[r] = at::vec::fmadd(xb, w0, acc0[r]);
      acc1[r] = at::vec::fmadd(xb, w1, acc1[r]);
    }
  }
  store_rows<X, R>(acc0, acc1, b, y, ldy, cols);
}

#if defined(ZY_DPBF16)
// bf16 x and w on a CPU with AVX512-BF16: vdpbf16ps multiplies a pair of k-steps per instruction (the
// products exact in fp32, summed into the fp32 accumulators), so a bf16 copy costs half the FMAs of
// widening it. At M = 8 the widening kernel is compute-bound: batch 8 took 21.8 ms against 11.4 at batch 1.
template <int R>
inline void panel_pairs(const at::BFloat16* x, int64_t ldx, const at::BFloat16* wp, int64_t K, const float* b,
                        at::BFloat16* y, int64_t ldy, int64_t cols) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  // One k-pair step: x[2kp] in each lane's low half, x[2kp + 1] in its high half (``bytes`` = 2 for the
  // last step of an odd K: its high half and the copy's padding are 0). A fixed-size copy, so the loop
  // keeps its accumulators in registers.
  auto step = [&](int64_t kp, auto bytes) {
    const at::BFloat16* w = wp + kp * 2 * P;
    __builtin_prefetch(w + AHEAD * P, 0, 0);  // 2 lines a step, AHEAD / 2 steps ahead
    __builtin_prefetch(w + AHEAD * P + P, 0, 0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + P);
    for (int r = 0; r < R; ++r) {
      int32_t pair = 0;
      std::memcpy(&pair, x + r * ldx + 2 * kp, decltype(bytes)::value);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc0[r] = _mm512_dpbf16_ps(acc0[r], xb, w0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], xb, w1);
    }
  };
  for (int64_t kp = 0; kp < K / 2; ++kp) step(kp, std::integral_constant<int, 4>{});
  if (K % 2) step(K / 2, std::integral_constant<int, 2>{});
  const int64_t lo = std::min<int64_t>(V, cols), hi = cols - lo;
  for (int r = 0; r < R; ++r) {
    Vec a0(acc0[r]), a1(acc1[r]);
    if (b) {
      a0 = a0 + Vec::loadu(b, lo);
      if (hi > 0) a1 = a1 + Vec::loadu(b + V, hi);
    }
    at::vec::convert_from_float<at::BFloat16>(a0, a1).store(y + r * ldy, cols);
  }
}
using PairFn = void (*)(const at::BFloat16*, int64_t, const at::BFloat16*, int64_t, const float*, at::BFloat16*,
                        int64_t, int64_t);
constexpr PairFn PAIRS_BY_ROWS[PAIR_ROWS + 1] = {nullptr,        panel_pairs<1>, panel_pairs<2>,
                                                 panel_pairs<3>, panel_pairs<4>, panel_pairs<5>,
                                                 panel_pairs<6>, panel_pairs<7>, panel_pairs<8>};
#endif

template <typename W, typename X>
using PanelFn = void (*)(const X*, int64_t, const W*, int64_t, const float*, X*, int64_t, int64_t);
template <typename W, typename X>
constexpr PanelFn<W, X> BY_ROWS[ROWS + 1] = {
    nullptr,          panel<W, X, 1>,  panel<W, X, 2>,  panel<W, X, 3>,  panel<W, X, 4>,  panel<W, X, 5>,
    panel<W, X, 6>,   panel<W, X, 7>,  panel<W, X, 8>,  panel<W, X, 9>,  panel<W, X, 10>, panel<W, X, 11>,
    panel<W, X, 12>,  panel<W, X, 13>, panel<W, X, 14>, panel<W, X, 15>, panel<W, X, 16>};

#if defined(CPU_CAPABILITY_AVX512)
// R fp32 rows against one panel kept as codes (panel_codes.h): each k-step's weights are rebuilt to
// the fp32 copy's exact values and meet the same FMAs in the same order, so y is the fp32 kernel's.
template <panel_codes::Format F, int R>
inline void panel_coded(const float* x, int64_t ldx, const uint8_t* wp, int64_t K, const float* b, float* y,
                        int64_t ldy, int64_t cols) {
  Vec acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = Vec(0.f);
  panel_codes::for_each_step<F>(wp, K, [&](int64_t k, __m512 w0, __m512 w1) {
    for (int r = 0; r < R; ++r) {
      const Vec xb(x[r * ldx + k]);
      acc0[r] = at::vec::fmadd(xb, Vec(w0), acc0[r]);
      acc1[r] = at::vec::fmadd(xb, Vec(w1), acc1[r]);
    }
  });
  store_rows<float, R>(acc0, acc1, b, y, ldy, cols);
}
// More rows than one sweep takes: the panel rebuilt once into fp32 [K, P] (L2-sized), then swept as a copy.
template <panel_codes::Format F>
inline void unpack_panel(const uint8_t* wp, int64_t K, float* out) {
  panel_codes::for_each_step<F>(wp, K, [&](int64_t k, __m512 w0, __m512 w1) {
    _mm512_storeu_ps(out + k * P, w0);
    _mm512_storeu_ps(out + k * P + V, w1);
  });
}
using CodedFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, const float*, float*, int64_t, int64_t);
template <panel_codes::Format F>
constexpr CodedFn CODED_BY_ROWS[ROWS + 1] = {
    nullptr,             panel_coded<F, 1>,  panel_coded<F, 2>,  panel_coded<F, 3>,  panel_coded<F, 4>,
    panel_coded<F, 5>,   panel_coded<F, 6>,  panel_coded<F, 7>,  panel_coded<F, 8>,  panel_coded<F, 9>,
    panel_coded<F, 10>,  panel_coded<F, 11>, panel_coded<F, 12>, panel_coded<F, 13>, panel_coded<F, 14>,
    panel_coded<F, 15>,  panel_coded<F, 16>};
constexpr bool CODES_BUILT = true;
#else
constexpr bool CODES_BUILT = false;  // the coded kernels are AVX-512 only: fp32 copies elsewhere
#endif

// One tensor handed to the op for a weight, and its version counter when last seen. Compiled graphs
// may each hold their own alias of a weight (a fused q/k/v view made per graph, a parameter rebound by
// a saved graph's loader), and each alias has a version counter of its own.
struct Alias {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  int64_t version;
};

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  std::vector<Alias> aliases;
  at::Tensor packed;
  panel_codes::Format format = panel_codes::kPlain;  // fp32 weights whose values are block codes: the codes

  bool same_weight(const at::Tensor& w) const {
    return !storage.expired() && storage._unsafe_get_target() == w.storage().unsafeGetStorageImpl() &&
           offset == w.storage_offset() && sizes == w.sizes().vec() && strides == w.strides().vec();
  }

  // Whether the copy is still the weight's values: no alias seen before was written in place since (a
  // write through one alias bumps that alias's counter only, so every live one is checked). A new
  // alias of the same storage is recorded as in sync: graphs that alternate, each with its own alias,
  // share one copy instead of re-packing it on every call.
  bool serves(const at::Tensor& w) {
    if (!same_weight(w)) return false;
    bool seen = false;
    for (const auto& a : aliases) {
      auto impl = a.impl.lock();
      if (impl && static_cast<int64_t>(impl->version_counter().current_version()) != a.version) return false;
      seen = seen || impl.get() == w.unsafeGetTensorImpl();
    }
    aliases.erase(std::remove_if(aliases.begin(), aliases.end(), [](const Alias& a) { return a.impl.expired(); }),
                  aliases.end());
    if (!seen) aliases.push_back(Alias{c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()), w._version()});
    return true;
  }
};

// Keyed by address, shape, the copy's dtype and whether codes may be kept: views that start at the same
// address (a fused q/k/v weight and its q part) get an entry each instead of re-packing each other's
// copy on every call.
using Key = std::tuple<const void*, int64_t, int64_t, at::ScalarType, bool>;
std::mutex cache_mutex;
std::map<Key, Entry> cache;
int64_t packs = 0;  // copies made so far (panel_cache_packs): a test's view of hits and misses
int64_t coded = 0;  // of which kept as codes (panel_cache_coded)
std::atomic<bool> codes_on{CODES_BUILT};  // panel_codes(enable): fp32 weights may keep a coded copy

// An fp32 weight's coded copy where its values are block codes (4-bit affine first, then 8-bit); else
// an undefined tensor.
std::pair<at::Tensor, panel_codes::Format> codes_for(const at::Tensor& w) {
  if (w.scalar_type() == at::kFloat && w.size(1) % panel_codes::KB == 0)
    for (auto f : {panel_codes::kAffine4, panel_codes::kScale8}) {
      at::Tensor c = panel_codes::encode(w, f, P);
      if (c.defined()) return {c, f};
    }
  return {at::Tensor(), panel_codes::kPlain};
}

std::pair<at::Tensor, panel_codes::Format> copy_for(const at::Tensor& w, at::ScalarType dtype, bool codes) {
  if (codes && dtype == at::kFloat) {
    auto coded = codes_for(w);
    if (coded.first.defined()) return coded;
  }
  return {pack(w, dtype), panel_codes::kPlain};
}

std::pair<at::Tensor, panel_codes::Format> packed_for(const at::Tensor& w, at::ScalarType dtype) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  const bool codes = codes_on.load();
  const Key key{w.data_ptr(), w.size(0), w.size(1), dtype, codes};
  auto it = cache.find(key);
  if (it != cache.end() && it->second.serves(w)) return {it->second.packed, it->second.format};
  for (auto e = cache.begin(); e != cache.end();)  // drop the copies of freed weights
    e = e->second.storage.expired() ? cache.erase(e) : std::next(e);
  auto [copy, format] = copy_for(w, dtype, codes);
  Entry entry{c10::weak_intrusive_ptr<c10::StorageImpl>(w.storage().getWeakStorageImpl()),
              w.storage_offset(),
              w.sizes().vec(),
              w.strides().vec(),
              {Alias{c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()), w._version()}},
              copy,
              format};
  ++packs;
  coded += format != panel_codes::kPlain;
  cache.insert_or_assign(key, std::move(entry));
  return {copy, format};
}

#if defined(CPU_CAPABILITY_AVX512)
// y [M, N] = x [M, K] @ w.T (+ b) over w's coded copy [panels, bytes]: the fp32 loop's split and sweeps.
void coded_linear(panel_codes::Format format, const float* xp, const at::Tensor& wp, int64_t M, int64_t K, int64_t N,
                  const float* bp, float* yp) {
  const int64_t panels = wp.size(0), per_panel = wp.size(1);
  const uint8_t* wpp = wp.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (P * K * static_cast<int64_t>(sizeof(float))));
  const CodedFn* by_rows =
      format == panel_codes::kAffine4 ? CODED_BY_ROWS<panel_codes::kAffine4> : CODED_BY_ROWS<panel_codes::kScale8>;
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    std::vector<float> unpacked(M > ROWS ? K * P : 0);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p * P, cols = std::min<int64_t>(P, N - n);
      const uint8_t* wt = wpp + p * per_panel;
      if (M <= ROWS) {
        by_rows[M](xp, K, wt, K, bp ? bp + n : nullptr, yp + n, N, cols);
        continue;
      }
      if (format == panel_codes::kAffine4) unpack_panel<panel_codes::kAffine4>(wt, K, unpacked.data());
      else unpack_panel<panel_codes::kScale8>(wt, K, unpacked.data());
      for (int64_t m = 0; m < M; m += ROWS) {
        const int64_t r = std::min<int64_t>(ROWS, M - m);
        BY_ROWS<float, float>[r](xp + m * K, K, unpacked.data(), K, bp ? bp + n : nullptr, yp + m * N + n, N, cols);
      }
    }
  });
}
#endif

// W: the copy's element type. fp32 x and w with an fp32 or fp16 copy, or bf16 x and w with a bf16 copy
// (a bf16 model: x widened as read, fp32 accumulation, the result rounded to bf16 once, as BLAS does).
template <typename W>
at::Tensor panel_linear_impl(const char* name, const at::Tensor& x, const at::Tensor& w,
                             const c10::optional<at::Tensor>& bias) {
  using X = std::conditional_t<std::is_same_v<W, at::BFloat16>, at::BFloat16, float>;
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), name,
              ": x [M, K] and w [N, K] expected, got ", x.sizes(), " and ", w.sizes());
  constexpr bool bf16 = std::is_same_v<W, at::BFloat16>;
  const at::ScalarType io = bf16 ? at::kBFloat16 : at::kFloat;
  TORCH_CHECK(x.scalar_type() == io && w.scalar_type() == io, name,
              bf16 ? ": bf16 x and w expected" : ": fp32 only", ", got ", x.scalar_type(), " and ", w.scalar_type());
  const at::ScalarType copy = c10::CppTypeToScalarType<W>::value;
  if (w.is_inference())  // no version counter to keep a copy in sync with
    return copy == io ? at::linear(x, w, bias) : at::linear(x, w.to(copy).to(io), bias);
  const auto packed = packed_for(w, copy);
  const at::Tensor& wp = packed.first;
  const panel_codes::Format format = packed.second;
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0), panels = wp.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return y;
  at::Tensor bc;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == io, name, ": bias must be ",
                bf16 ? "bf16" : "fp32", " [N]");
    bc = bias->to(at::kFloat).contiguous();
    bp = bc.data_ptr<float>();
  }
  const X* xp = xc.data_ptr<X>();
  X* yp = y.data_ptr<X>();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<W, float>) {
    if (format != panel_codes::kPlain) {
      coded_linear(format, xp, wp, M, K, N, bp, yp);
      return y;
    }
  }
#endif
  const W* wpp = wp.data_ptr<W>();
  // ~64 KB of weights per task at least: a smaller split costs more in fork/join than it saves
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (P * K * static_cast<int64_t>(sizeof(W))));
  const int64_t per_panel = wp.numel() / panels;  // K x P, or K rounded up to even for the pair layout
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p * P, cols = std::min<int64_t>(P, N - n);
      const W* wt = wpp + p * per_panel;
#if defined(ZY_DPBF16)
      if constexpr (std::is_same_v<W, at::BFloat16>) {
        for (int64_t m = 0; m < M; m += PAIR_ROWS) {  // later sweeps find the panel in L1/L2
          const int64_t r = std::min<int64_t>(PAIR_ROWS, M - m);
          PAIRS_BY_ROWS[r](xp + m * K, K, wt, K, bp ? bp + n : nullptr, yp + m * N + n, N, cols);
        }
        continue;
      }
#endif
      for (int64_t m = 0; m < M; m += ROWS) {  // more than 16 rows: the panel is in L1/L2 by then
        const int64_t r = std::min<int64_t>(ROWS, M - m);
        BY_ROWS<W, X>[r](xp + m * K, K, wt, K, bp ? bp + n : nullptr, yp + m * N + n, N, cols);
      }
    }
  });
  return y;
}

// fp32 or bf16 (a bf16 model's decode: half the bytes of fp32 to stream, the kernel unchanged).
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  if (x.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kBFloat16)
    return panel_linear_impl<at::BFloat16>("panel_linear", x, w, bias);
  return panel_linear_impl<float>("panel_linear", x, w, bias);
}

// The same over a half-precision copy of w (fp32 math): half the bytes a step streams, for weights
// whose low bits do not matter (a draft head: its drafts are verified by the target) or that are
// fp16 values already (EAGLE heads are saved in fp16, so their products are unchanged).
at::Tensor panel_linear_f16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return panel_linear_impl<at::Half>("panel_linear_f16", x, w, bias);
}

int64_t panel_cache_bytes() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  int64_t total = 0;
  for (const auto& kv : cache)
    if (!kv.second.storage.expired()) total += kv.second.packed.nbytes();
  return total;
}

int64_t panel_cache_packs() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return packs;
}

int64_t panel_cache_coded() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return coded;
}

// Whether fp32 weights made block codes keep a coded copy from now on (copies already made stay); returns
// the previous setting. Always false where the coded kernels are not built (not AVX-512).
bool panel_codes_enable(bool enable) { return codes_on.exchange(enable && CODES_BUILT); }

// Bytes of the coded copy the op would keep of w (0: it would keep the fp32 copy), without keeping it:
// what a decode step streams, for bandwidth accounting.
int64_t panel_coded_bytes(const at::Tensor& w) {
  if (!codes_on.load() || w.dim() != 2 || w.is_inference()) return 0;
  const at::Tensor coded = codes_for(w).first;
  return coded.defined() ? static_cast<int64_t>(coded.nbytes()) : 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zycompile_cpu, lib) {
  lib.def("panel_linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  lib.def("panel_linear_f16(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  lib.def("panel_cache_bytes() -> int");
  lib.def("panel_cache_packs() -> int");
  lib.def("panel_cache_coded() -> int");
  lib.def("panel_codes(bool enable) -> bool");
  lib.def("panel_coded_bytes(Tensor w) -> int");
}

TORCH_LIBRARY_IMPL(zycompile_cpu, CPU, lib) {
  lib.impl("panel_linear", &panel_linear);
  lib.impl("panel_linear_f16", &panel_linear_f16);
  lib.impl("panel_coded_bytes", &panel_coded_bytes);
}

TORCH_LIBRARY_IMPL(zycompile_cpu, CompositeExplicitAutograd, lib) {
  lib.impl("panel_cache_bytes", &panel_cache_bytes);
  lib.impl("panel_cache_packs", &panel_cache_packs);
  lib.impl("panel_cache_coded", &panel_cache_coded);
  lib.impl("panel_codes", &panel_codes_enable);
}
