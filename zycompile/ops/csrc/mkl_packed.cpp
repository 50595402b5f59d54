// y = x @ w.T (+ b) with w in MKL's packed SGEMM format, one packed copy serving every M.
//
// ATen's mkl_linear packs for one batch size and runs unpacked at any other M, so a dynamic-length
// prefill graph never got the packed speed. With MKL 2024.2 a B packed with one m computes any other
// M exactly (its packed size does not depend on m); that is observed, not promised by MKL's docs, so
// ops/mkl_packed.py checks it once per process before the candidate is used. The m given when packing
// is a hint for MKL's kernel choice. MKL is the copy inside libtorch_cpu (its cblas symbols are
// exported), LP64 interface: an ILP64 build would need the _64 entry points.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>

extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest);
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kBMatrix = 162, kPacked = 151;

int64_t packed_floats(int64_t m, int64_t n, int64_t k) {
  return static_cast<int64_t>((cblas_sgemm_pack_get_size(kBMatrix, m, n, k) + sizeof(float) - 1) / sizeof(float));
}

void check_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "mkl_packed: ", what, "=", v, " exceeds MKL's 32-bit interface");
}

// w [N, K] row-major fp32 -> an fp32 buffer holding MKL's packed w.T. It must stay at its address (the
// layout depends on the buffer's alignment): callers keep the tensor and never copy it.
at::Tensor pack(const at::Tensor& w, int64_t m_hint) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "mkl_packed.pack: fp32 w [N, K] expected, got ",
              w.scalar_type(), " ", w.sizes());
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1);
  TORCH_CHECK(n > 0 && k > 0, "mkl_packed.pack: empty weight ", w.sizes());
  check_int(n, "N"), check_int(k, "K"), check_int(m_hint, "M hint");
  const int64_t hint = std::max<int64_t>(m_hint, 1);
  // sized for both M = 1 (what linear() checks against) and the hint (what MKL writes)
  at::Tensor buf = at::empty({std::max(packed_floats(1, n, k), packed_floats(hint, n, k))}, wc.options());
  cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, hint, n, k, 1.0f, wc.data_ptr<float>(), k,
                   buf.data_ptr<float>());
  return buf;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t k,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == k, "mkl_packed.linear: fp32 x [M, ", k,
              "] expected, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous() && packed.numel() >= packed_floats(1, n, k),
              "mkl_packed.linear: the packed buffer is not a [", n, ", ", k, "] weight's");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0);
  check_int(m, "M");
  at::Tensor y = at::empty({m, n}, xc.options());
  if (m == 0) return y;
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, xc.data_ptr<float>(), k, packed.data_ptr<float>(), k,
                      0.0f, y.data_ptr<float>(), n);
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

}  // namespace

TORCH_LIBRARY(zycompile_mkl, lib) {
  lib.def("pack(Tensor w, int m_hint) -> Tensor");
  lib.def("linear(Tensor x, Tensor packed, int n, int k, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(zycompile_mkl, CPU, lib) {
  lib.impl("pack", &pack);
  lib.impl("linear", &linear);
}
