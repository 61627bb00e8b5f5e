// The CPU kernels' entry points, and the one matrix-product helper they share.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// The Fortran BLAS that libtorch_cpu carries (MKL or OpenBLAS, 32-bit integers), declared weak: a
// torch build without it leaves these null and products go through ATen instead. Calling it
// directly saves the tensor wrappers and dispatch of at::addmm, microseconds on each of the
// thousands of block products of joint attention.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace vivit_kernels {

// Column-major BLAS sees a row-major matrix as its transpose: C^T = op(B)^T op(A)^T. Returns false
// (nothing done) where no BLAS symbol is present or a size does not fit its 32-bit integers.
template <typename T>
bool fortran_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                  const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  auto* blas = [] {
    if constexpr (std::is_same_v<T, float>) return &sgemm_;
    else return &dgemm_;
  }();
  if (blas == nullptr) return false;
  // BLAS insists on leading dims at least the stored row length, even for a single row.
  lda = std::max(lda, trans_a ? m : k), ldb = std::max(ldb, trans_b ? k : n), ldc = std::max(ldc, n);
  for (int64_t x : {m, n, k, lda, ldb, ldc})
    if (x > INT_MAX) return false;
  const int M = int(n), N = int(m), K = int(k), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  blas(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  return true;
}

// attention.cpp, the contract of vivit_kernels/ops/attention.py: q, k, v (B, H, N, Dh) with any
// strides, N = prefix + frames * S. Returns out as a (B, H, N, Dh) view of a (B, N, H, Dh) buffer,
// the row log-sum-exp (B, H, N) of the scaled logits, and the per-frame outputs (B, Ha, G, P, Dh)
// and log-sum-exps (B, Ha, G, P) of the prefix queries of the spatial heads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t frames, int64_t prefix,
    c10::string_view layout, c10::string_view mode, double scale);

// dq, dk, dv, each a (B, H, N, Dh) view of a (B, N, H, Dh) buffer, like out.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& prefix_out, const at::Tensor& prefix_lse, int64_t frames, int64_t prefix,
    c10::string_view layout, c10::string_view mode, double scale);

// The same on the packed projection: qkv (B, N, 3 * H * Dh) with any strides; out (B, N, H * Dh)
// and the gradient of qkv (B, N, 3 * H * Dh), written by the kernels in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_packed_forward(
    const at::Tensor& qkv, int64_t heads, int64_t frames, int64_t prefix, c10::string_view layout,
    c10::string_view mode, double scale);
at::Tensor attention_packed_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                     const at::Tensor& lse, const at::Tensor& prefix_out, const at::Tensor& prefix_lse,
                                     int64_t heads, int64_t frames, int64_t prefix, c10::string_view layout,
                                     c10::string_view mode, double scale);

// tubelet.cpp: video (B, C, T, H, W) any strides, weight (D, C, t, h, w), bias (D,), pos_embed (nt * S', D).
// Returns tokens (B, nt, S', D).
at::Tensor tubelet_forward(
    const at::Tensor& video, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pos_embed);
// d(video), laid out as at::empty_like(video); zero where no whole tube reaches.
at::Tensor tubelet_backward_video(const at::Tensor& grad, const at::Tensor& video, const at::Tensor& weight);
// {d(weight)} (D, C, t, h, w), or {d(weight), d(bias)} with bias_grad.
std::vector<at::Tensor> tubelet_backward_weight(const at::Tensor& grad, const at::Tensor& video,
                                                const at::Tensor& weight, bool bias_grad);
// d(pos_embed) (nt * S', D): grad (B, nt, S', D) summed over the batch.
at::Tensor tubelet_backward_pos(const at::Tensor& grad);

// Products with m * n * k below this go to small_gemm, larger ones to BLAS. A BLAS call through
// ATen costs microseconds of tensor setup: more than a temporal group's 32 x 32 x 64 blocks take.
constexpr int64_t kSmallGemm = 1 << 17;

// block_math.cpp: the loops on blocks, vectorised for the CPU at hand (x86-64-v4 / v3 / baseline
// clones, picked when the library loads). small_gemm is gemm below without BLAS, for tiny blocks.
void small_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void small_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);
// max over j of x[j] * scale.
float scaled_max(const float* x, int64_t n, float scale);
double scaled_max(const double* x, int64_t n, double scale);
// x[j] = exp(x[j] * scale - shift); returns the sum. NaN stays NaN.
float exp_sum(float* x, int64_t n, float scale, float shift);
double exp_sum(double* x, int64_t n, double scale, double shift);
// The softmax backward on transposed scores: for rows j < n (keys) and columns i < m (queries) of
// pt and dpt (n x m, contiguous), pt = exp(pt * scale - lse[i]) (the probabilities from the
// logits), then dpt = pt * (dpt - delta[i]) * scale (the gradient of the unscaled logits).
void softmax_grad_cols(float* pt, float* dpt, int64_t n, int64_t m, float scale, const float* lse,
                       const float* delta);
void softmax_grad_cols(double* pt, double* dpt, int64_t n, int64_t m, double scale, const double* lse,
                       const double* delta);
// Rows i < m of x (n entries, row stride ld) multiplied by 1 / by[i].
void divide_rows(float* x, int64_t m, int64_t n, int64_t ld, const float* by);
void divide_rows(double* x, int64_t m, int64_t n, int64_t ld, const double* by);
// Row-major C (m x n) = A B (+ C with accumulate), A stored m x k, B stored k x n or, transposed,
// n x k (then copied transposed into scratch first), through ATen's cpublas::brgemm: oneDNN's
// brgemm micro-kernel on x86 CPUs with AVX2, else its BLAS fallback.
void brgemm(bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
            bool accumulate, float* c, int64_t ldc);

// One short attention group (temporal: a token's T frames), every member a query and a key:
// member i's rows are q + i * sq, ... (strides in elements, rows of head_dim contiguous), its
// log-sum-exp lse[i * sl] (forward) or saved_lse[i * sl] (backward). Forward writes out and lse;
// backward reads dout and saved_lse (not out) and writes dq, dk, dv in full. Groups of up to
// kShortGroup members. The `ahead` arrays next[a] (rows next_stride[a] apart, `length` rows of
// head_dim each) are the next group's: fetched into L2 a share at a time while this group computes.
constexpr int64_t kShortGroup = 32;
// The arrays a backward group reads (q, k, v, dout): its first `next`, before those it writes.
constexpr int kShortGroupInputs = 4;

template <typename T>
struct ShortGroup {
  int64_t length, head_dim;
  const T *q, *k, *v;
  int64_t sq, sk, sv;
  T* out;
  int64_t so;
  T* lse;
  int64_t sl;
  const T* saved_lse;
  const T* dout;
  int64_t sdo;
  T *dq, *dk, *dv;
  int64_t sdq, sdk, sdv;
  int ahead = 0;
  const T* next[7];
  int64_t next_stride[7];
};
void short_group_forward(const ShortGroup<float>& group, float scale);
void short_group_forward(const ShortGroup<double>& group, double scale);
void short_group_backward(const ShortGroup<float>& group, float scale);
void short_group_backward(const ShortGroup<double>& group, double scale);
// The backward's gradients may be written by streamed stores, which later loads and stores do
// not wait for: each thread calls this after its last group, before anyone reads them.
void fence_streamed_stores();

// Row-major C (m x n, row stride ldc) = beta * C + alpha * op(A) op(B), where op(A) is m x k and
// A is stored m x k (row stride lda) or, transposed, k x m; likewise B. Every last dim has stride 1.
// Large products go to oneDNN's brgemm (float, A as stored) or else to BLAS (no copies: the row
// strides are BLAS leading dims), directly where libtorch_cpu exports it, else through ATen; small
// ones, like the 16 x 16 blocks of temporal attention, cost less as register-tiled loops than as
// a BLAS call.
// beta == 0 ignores C's old contents (NaN included), as BLAS does.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (m * n * k >= kSmallGemm) {
    // oneDNN's brgemm micro-kernel reads the blocks in place where BLAS first packs them: on the
    // blocks of attention (196 x 196 x 64, 196 x 64 x 196) it ran at 1.2-1.3x MKL's sgemm rate
    // on the AMD EPYC measured, level with it on large products. Its B is read row by row, so a
    // transposed B (k x n, the thin side of a block product: keys, values or queries of one
    // head) is transposed first; a transposed A (the scores) stays with BLAS.
#ifdef CPUBLAS_BRGEMM_F32F32F32
    if constexpr (std::is_same_v<T, float>)
      if (!trans_a && alpha == 1.0f && (beta == 0.0f || beta == 1.0f))
        return brgemm(trans_b, m, n, k, a, lda, b, ldb, beta == 1.0f, c, ldc);
#endif
    if (fortran_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) return;
    auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    auto matrix = [&](const T* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
      // op(X) is rows x cols; stored transposed it is the transpose of a cols x rows matrix.
      auto x = trans ? at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, options).t()
                     : at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, options);
      return x;
    };
    at::Tensor A = matrix(a, trans_a, m, k, lda), B = matrix(b, trans_b, k, n, ldb);
    at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, options);
    if (beta == T(0) && alpha == T(1)) {
      at::mm_out(C, A, B);
    } else {
      at::addmm_out(C, C, A, B, beta, alpha);  // beta == 0 ignores C (NaN included), as BLAS does
    }
    return;
  }
  small_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace vivit_kernels
