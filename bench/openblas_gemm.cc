// One fp32 GEMM as an XLA FFI custom call on the CPU, computed by OpenBLAS (numpy's bundled
// scipy-openblas): the experiment of docs/performance.md ("An OpenBLAS GEMM inside the step").
// C[M, N] = op(A) op(B), row-major, op = transpose when the attribute is 1. The sgemm entry point
// is handed over at load time (htgrpo_gemm_init), so the library links against nothing but the FFI
// headers.
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Sgemm = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                       int64_t ldc);
static Sgemm sgemm = nullptr;

extern "C" void htgrpo_gemm_init(void* gemm_fn) { sgemm = reinterpret_cast<Sgemm>(gemm_fn); }

static ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                       int32_t trans_a, int32_t trans_b) {
  if (!sgemm) return ffi::Error::Internal("htgrpo_gemm: htgrpo_gemm_init was not called");
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("htgrpo_gemm: operands must be 2-D");
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t kb = trans_b ? bd[1] : bd[0], n = trans_b ? bd[0] : bd[1];
  if (k != kb) return ffi::Error::InvalidArgument("htgrpo_gemm: contracting dimensions differ");
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enums
  sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f, a.typed_data(),
        ad[1], b.typed_data(), bd[1], 0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HtgrpoGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("trans_a")
                                  .Attr<int32_t>("trans_b"));
