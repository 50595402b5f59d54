// y = x @ w.T (+ b) for a few rows: the GEMMs of a decode step or a speculative verify on CPU.
//
// x [M, K] (M <= 16, rows contiguous), w [N, K] row-major as the model holds it, b [N] or absent, all
// fp32; y [M, N]. Such a product is a pure read of w: M * N * K multiply-adds against N * K * 4 bytes,
// a few flops per byte. BLAS picks kernels for large M here; on the 2-core Xeon it streams an M = 1
// GEMV at 13-22 GB/s and M = 4..8 at 4-10 GB/s (it re-reads w per row block). This kernel reads each
// weight row once for all M rows: a tile of C weight rows is dotted with R input rows at a time (R x C
// accumulators in registers, one weight load feeding R fused multiply-adds). Up to 8 rows take one
// sweep over the tile (4 x 4 up to 4 rows, M x 2 for 5-8), so w streams without pauses; more rows take
// 4 x 4 blocks and the tile's later blocks find it in L1. While a tile is summed, the next tile is
// prefetched at the same offset: its C rows are C streams K floats apart that the hardware prefetcher
// picks up late (each row ends within a few pages). Tiles of weight rows split over threads, so each
// thread streams one contiguous stretch of w. On the Xeon, SmolLM2's decode GEMMs: M = 1..8 in 26-38 ms
// against 29-53 ms without the prefetch and one-sweep tiles (an interleaved A/B of both loops, cold
// weights; bench/RESULTS.md 2026-11-28 07:2x; bench/small_linear.py times this kernel against BLAS).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t MAX_M = 16;
constexpr int64_t NT = 4;     // weight rows per tile: 4 x K floats stay in L1 while the row blocks reuse them
constexpr int64_t MT = 4;     // input rows per block: MT x NT = 16 accumulators, with NT + 1 vectors loaded
constexpr int64_t SWEEP = 8;  // up to this many rows take one sweep over tiles of SWEEP_NT weight rows
constexpr int64_t SWEEP_NT = 2;

inline float hsum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// out[m, n] = x[m, :] . w[n, :] (+ b[n]) for m < R, n < C: R input rows against C weight rows.
template <int R, int C>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t K, const float* b, float* y, int64_t ldy) {
  constexpr int64_t V = Vec::size();
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec(0.f);
  int64_t k = 0;
  for (; k + V <= K; k += V) {
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Vec::loadu(w + c * K + k);
    // the next tile (C rows on): prefetch is a hint, so the last tile's reads past w cannot fault
    for (int c = 0; c < C; ++c) __builtin_prefetch(w + (C + c) * K + k, 0, 3);
    for (int r = 0; r < R; ++r) {
      Vec xv = Vec::loadu(x + r * ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  if (k < K) {  // the tail: masked loads read zeros past K
    const int64_t n = K - k;
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Vec::loadu(w + c * K + k, n);
    for (int r = 0; r < R; ++r) {
      Vec xv = Vec::loadu(x + r * ldx + k, n);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * ldy + c] = hsum(acc[r][c]) + (b ? b[c] : 0.f);
}

// All M rows against C weight rows: up to SWEEP rows in one pass, more in blocks of MT rows.
template <int C>
inline void rows(const float* x, int64_t M, int64_t ldx, const float* w, int64_t K, const float* b, float* y,
                 int64_t ldy) {
  int64_t m = 0;
  if (M > SWEEP)
    for (; m + MT <= M; m += MT) tile<MT, C>(x + m * ldx, ldx, w, K, b, y + m * ldy, ldy);
  x += m * ldx, y += m * ldy;
  switch (M - m) {
    case 8: tile<8, C>(x, ldx, w, K, b, y, ldy); break;
    case 7: tile<7, C>(x, ldx, w, K, b, y, ldy); break;
    case 6: tile<6, C>(x, ldx, w, K, b, y, ldy); break;
    case 5: tile<5, C>(x, ldx, w, K, b, y, ldy); break;
    case 4: tile<4, C>(x, ldx, w, K, b, y, ldy); break;
    case 3: tile<3, C>(x, ldx, w, K, b, y, ldy); break;
    case 2: tile<2, C>(x, ldx, w, K, b, y, ldy); break;
    case 1: tile<1, C>(x, ldx, w, K, b, y, ldy); break;
    default: break;
  }
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "small_linear: x [M, K] and w [N, K] expected, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "small_linear: fp32 only");
  TORCH_CHECK(x.size(0) <= MAX_M, "small_linear: at most ", MAX_M, " rows, got ", x.size(0));
  TORCH_CHECK(w.stride(1) == 1 && w.stride(0) == w.size(1), "small_linear: w must be row-major [N, K]");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0), ldx = xc.stride(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* bp = nullptr;
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.numel() == N && bc.scalar_type() == at::kFloat, "small_linear: bias must be fp32 [N]");
    bp = bc.data_ptr<float>();
  }
  if (M == 0 || N == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nt = M > MT && M <= SWEEP ? SWEEP_NT : NT;  // 5-8 rows: M x 2 accumulators
  const int64_t tiles = (N + nt - 1) / nt;
  // ~64 KB of weights per task at least: a smaller split costs more in fork/join than it saves
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (nt * K * 4));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * nt, c = std::min<int64_t>(nt, N - n);
      const float* wt = wp + n * K;
      const float* bt = bp ? bp + n : nullptr;
      switch (c) {
        case 4: rows<4>(xp, M, ldx, wt, K, bt, yp + n, N); break;
        case 3: rows<3>(xp, M, ldx, wt, K, bt, yp + n, N); break;
        case 2: rows<2>(xp, M, ldx, wt, K, bt, yp + n, N); break;
        default: rows<1>(xp, M, ldx, wt, K, bt, yp + n, N); break;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zycompile_cpu, lib) { lib.def("small_linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor"); }

TORCH_LIBRARY_IMPL(zycompile_cpu, CPU, lib) { lib.impl("small_linear", &small_linear); }
