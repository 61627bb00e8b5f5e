// The loops that run on blocks: softmax exponentials and the products too small for BLAS.
//
// The library is built for the baseline x86-64 ISA (it may move between machines), so the float
// versions are compiled three times, for AVX-512, AVX2 and the baseline, and the loader picks the
// best the CPU has (GCC/Clang function multiversioning). std::exp does not vectorise; expf below
// is a branch-free polynomial that does, accurate to about 2 ulp.

#include "kernels.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define VIVIT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VIVIT_CLONES
#endif

namespace vivit_kernels {
namespace {

// exp(x) for finite x by x = n ln2 + r, |r| <= ln2 / 2: exp(x) = 2^n * p(r) (Cephes' coefficients).
inline float expf_poly(float x) {
  const float lo = -87.33f, hi = 88.37f;
  float y = x > hi ? hi : x;  // NaN passes through both clamps and poisons the result
  y = y < lo ? lo : y;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (y * 1.44269504f + magic) - magic;
  const float r = y - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < lo ? 0.0f : p * two_n;
}

// c[i] += alpha * sum_p a[i][p] b[p] (rows of c and b, vectorised along them).
template <typename T>
inline __attribute__((always_inline)) void add_row_products(int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                                                            int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    for (int64_t p = 0; p < k; ++p) {
      const T x = alpha * a[i * lda + p];
      const T* bp = b + p * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += x * bp[j];
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void small_gemm_impl(bool trans_a, bool trans_b, int64_t m, int64_t n,
                                                           int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                                                           int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < n; ++j) ci[j] = T(0);
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) ci[j] *= beta;
    }
  }
  if (!trans_a && trans_b) {  // c[i][j] += alpha * <a[i], b[j]>
    for (int64_t i = 0; i < m; ++i) {
      const T* ai = a + i * lda;
      for (int64_t j = 0; j < n; ++j) {
        const T* bj = b + j * ldb;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t p = 0; p < k; ++p) acc += ai[p] * bj[p];
        c[i * ldc + j] += alpha * acc;
      }
    }
  } else if (!trans_a && !trans_b) {
    add_row_products(m, n, k, alpha, a, lda, b, ldb, c, ldc);
  } else if (trans_a && !trans_b) {  // c[i] += alpha * sum_p a[p][i] b[p]
    for (int64_t p = 0; p < k; ++p) {
      const T* ap = a + p * lda;
      const T* bp = b + p * ldb;
      for (int64_t i = 0; i < m; ++i) {
        const T x = alpha * ap[i];
        T* ci = c + i * ldc;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ci[j] += x * bp[j];
      }
    }
  } else {
    TORCH_CHECK(false, "small_gemm: both operands transposed is not implemented");
  }
}

// float products: register tiles of up to 4 rows x 64 columns of C, held as 16-float vectors
// (GCC vector extensions: one zmm under AVX-512, two ymm under AVX2), so each element of B loaded
// feeds 4 multiply-adds and C is loaded and stored once per tile instead of once per step of k.
typedef float f32x16 __attribute__((vector_size(64), aligned(4), may_alias));

template <int R, int V>
inline __attribute__((always_inline)) void tile_f32(int64_t k, float alpha, const float* a, int64_t sa_i,
                                                    int64_t sa_p, const float* b, int64_t ldb, float* c, int64_t ldc) {
  f32x16 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = f32x16{};
  for (int64_t p = 0; p < k; ++p) {
    f32x16 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = *reinterpret_cast<const f32x16*>(b + p * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * sa_i + p * sa_p];
      for (int v = 0; v < V; ++v) acc[r][v] += x * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) *reinterpret_cast<f32x16*>(c + r * ldc + 16 * v) += alpha * acc[r][v];
}

template <int V>
inline __attribute__((always_inline)) void tile_rows_f32(int64_t rows, int64_t k, float alpha, const float* a,
                                                         int64_t sa_i, int64_t sa_p, const float* b, int64_t ldb,
                                                         float* c, int64_t ldc) {
  switch (rows) {
    case 4: return tile_f32<4, V>(k, alpha, a, sa_i, sa_p, b, ldb, c, ldc);
    case 3: return tile_f32<3, V>(k, alpha, a, sa_i, sa_p, b, ldb, c, ldc);
    case 2: return tile_f32<2, V>(k, alpha, a, sa_i, sa_p, b, ldb, c, ldc);
    default: return tile_f32<1, V>(k, alpha, a, sa_i, sa_p, b, ldb, c, ldc);
  }
}

// C += alpha * op(A) B with B's rows contiguous; op(A)[i][p] = a[i * sa_i + p * sa_p].
inline __attribute__((always_inline)) void tiled_f32(int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                                                     int64_t sa_i, int64_t sa_p, const float* b, int64_t ldb, float* c,
                                                     int64_t ldc) {
  for (int64_t i0 = 0; i0 < m; i0 += 4) {
    const int64_t rows = std::min<int64_t>(4, m - i0);
    const float* ai = a + i0 * sa_i;
    float* ci = c + i0 * ldc;
    int64_t j0 = 0;
    for (; j0 + 64 <= n; j0 += 64) tile_rows_f32<4>(rows, k, alpha, ai, sa_i, sa_p, b + j0, ldb, ci + j0, ldc);
    for (; j0 + 16 <= n; j0 += 16) tile_rows_f32<1>(rows, k, alpha, ai, sa_i, sa_p, b + j0, ldb, ci + j0, ldc);
    if (j0 == n) continue;
    for (int64_t i = 0; i < rows; ++i)  // the last n % 16 columns
      for (int64_t p = 0; p < k; ++p) {
        const float x = alpha * ai[i * sa_i + p * sa_p];
        const float* bp = b + p * ldb;
#pragma omp simd
        for (int64_t j = j0; j < n; ++j) ci[i * ldc + j] += x * bp[j];
      }
  }
}

// One butterfly step of a 16 x 16 transpose: rows i and i + D (i & D == 0) swap their off-diagonal
// D-wide blocks; the steps D = 8, 4, 2, 1 together move element (i, j) to (j, i).
typedef int32_t i32x16 __attribute__((vector_size(64)));

template <int D>
inline __attribute__((always_inline)) void butterfly16(f32x16 (&x)[16]) {
  constexpr i32x16 low = {0 & D ? 16 + (0 ^ D) : 0,    1 & D ? 16 + (1 ^ D) : 1,    2 & D ? 16 + (2 ^ D) : 2,
                          3 & D ? 16 + (3 ^ D) : 3,    4 & D ? 16 + (4 ^ D) : 4,    5 & D ? 16 + (5 ^ D) : 5,
                          6 & D ? 16 + (6 ^ D) : 6,    7 & D ? 16 + (7 ^ D) : 7,    8 & D ? 16 + (8 ^ D) : 8,
                          9 & D ? 16 + (9 ^ D) : 9,    10 & D ? 16 + (10 ^ D) : 10, 11 & D ? 16 + (11 ^ D) : 11,
                          12 & D ? 16 + (12 ^ D) : 12, 13 & D ? 16 + (13 ^ D) : 13, 14 & D ? 16 + (14 ^ D) : 14,
                          15 & D ? 16 + (15 ^ D) : 15};
  constexpr i32x16 high = {0 & D ? 16 + 0 : 0 ^ D,    1 & D ? 16 + 1 : 1 ^ D,    2 & D ? 16 + 2 : 2 ^ D,
                           3 & D ? 16 + 3 : 3 ^ D,    4 & D ? 16 + 4 : 4 ^ D,    5 & D ? 16 + 5 : 5 ^ D,
                           6 & D ? 16 + 6 : 6 ^ D,    7 & D ? 16 + 7 : 7 ^ D,    8 & D ? 16 + 8 : 8 ^ D,
                           9 & D ? 16 + 9 : 9 ^ D,    10 & D ? 16 + 10 : 10 ^ D, 11 & D ? 16 + 11 : 11 ^ D,
                           12 & D ? 16 + 12 : 12 ^ D, 13 & D ? 16 + 13 : 13 ^ D, 14 & D ? 16 + 14 : 14 ^ D,
                           15 & D ? 16 + 15 : 15 ^ D};
  for (int i = 0; i < 16; ++i)
    if (!(i & D)) {
      const f32x16 a = x[i], b = x[i + D];
      x[i] = __builtin_shuffle(a, b, low);
      x[i + D] = __builtin_shuffle(a, b, high);
    }
}

// dst[p][j] = src[j][p] for a 16 x 16 block (row strides lds, ldd): vector shuffles instead of
// 256 scalar moves (the transposed key blocks of temporal attention).
inline __attribute__((always_inline)) void transpose16_f32(const float* src, int64_t lds, float* dst, int64_t ldd) {
  f32x16 x[16];
  for (int i = 0; i < 16; ++i) x[i] = *reinterpret_cast<const f32x16*>(src + i * lds);
  butterfly16<8>(x);
  butterfly16<4>(x);
  butterfly16<2>(x);
  butterfly16<1>(x);
  for (int i = 0; i < 16; ++i) *reinterpret_cast<f32x16*>(dst + i * ldd) = x[i];
}

}  // namespace

VIVIT_CLONES void small_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                             int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    if (beta == 0.0f) {
      for (int64_t j = 0; j < n; ++j) ci[j] = 0.0f;
    } else if (beta != 1.0f) {
      for (int64_t j = 0; j < n; ++j) ci[j] *= beta;
    }
  }
  const int64_t sa_i = trans_a ? 1 : lda, sa_p = trans_a ? lda : 1;
  if (!trans_b) return tiled_f32(m, n, k, alpha, a, sa_i, sa_p, b, ldb, c, ldc);
  // B stored n x k: transposed once into k x n scratch, whose rows the tiles read.
  thread_local std::vector<float> scratch;
  if (scratch.size() < size_t(k * n)) scratch.resize(k * n);
  float* bt = scratch.data();
  int64_t j0 = 0;
  if (k % 16 == 0)
    for (; j0 + 16 <= n; j0 += 16)
      for (int64_t p = 0; p < k; p += 16) transpose16_f32(b + j0 * ldb + p, ldb, bt + p * n + j0, n);
  for (int64_t j = j0; j < n; ++j)
    for (int64_t p = 0; p < k; ++p) bt[p * n + j] = b[j * ldb + p];
  tiled_f32(m, n, k, alpha, a, sa_i, sa_p, bt, n, c, ldc);
}

void small_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  small_gemm_impl(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

VIVIT_CLONES float scaled_max(const float* x, int64_t n, float scale) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j] * scale);
  return m;
}

double scaled_max(const double* x, int64_t n, double scale) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j] * scale);
  return m;
}

VIVIT_CLONES float exp_sum(float* x, int64_t n, float scale, float shift) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = expf_poly(x[j] * scale - shift);
    sum += x[j];
  }
  return sum;
}

double exp_sum(double* x, int64_t n, double scale, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] * scale - shift);
    sum += x[j];
  }
  return sum;
}

}  // namespace vivit_kernels
