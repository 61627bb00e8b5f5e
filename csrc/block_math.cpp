// The loops that run on blocks: softmax exponentials, the products too small for BLAS, and whole
// short groups.
//
// The library is built for the baseline x86-64 ISA (it may move between machines), so the float
// versions are compiled three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 with FMA: "avx2"
// alone would leave every multiply-add a multiply and an add) and the baseline, and the loader
// picks the best the CPU has (GCC/Clang function multiversioning). std::exp does not vectorise; expf below
// is a branch-free polynomial that does, accurate to about 2 ulp.

#include "kernels.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define VIVIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VIVIT_CLONES
#endif

namespace vivit_kernels {
namespace {

// GCC vector extensions: 16 floats are one zmm under AVX-512, two ymm under AVX2. The exponential
// works on 8: GCC lowers a select (?:) on 16 floats to scalar code under AVX2.
typedef float f32x16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// 2^n for integral n in [-126, 127], by writing the exponent bits.
inline float pow2_int(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline __attribute__((always_inline)) f32x8 pow2_int(f32x8 n) {
  return (f32x8)((__builtin_convertvector(n, i32x8) + 127) << 23);
}

// exp(x) for finite x by x = n ln2 + r, |r| <= ln2 / 2: exp(x) = 2^n * p(r) (Cephes' coefficients),
// accurate to about 2 ulp. One body for a float and for 8 of them: the compiler does not vectorise
// a loop over the scalar form (its clamps become branches), so the loops call the vector form.
template <typename V>
inline __attribute__((always_inline)) V expf_poly(V x) {
  const V lo = V{} - 87.33f, hi = V{} + 88.37f, zero = V{};
  V y = x > hi ? hi : x;  // NaN passes through both clamps and poisons the result
  y = y < lo ? lo : y;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (y * 1.44269504f + magic) - magic;
  const V r = y - n * 0.693359375f + n * 2.12194440e-4f;
  V p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return x < lo ? zero : p * pow2_int(n);
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

// float products: register tiles of up to 4 rows x 64 columns of C, held as 16-float vectors, so
// each element of B loaded feeds 4 multiply-adds and C is loaded and stored once per tile instead of
// once per step of k.
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

// x[j] = exp(x[j]) for j < n.
template <typename T>
inline __attribute__((always_inline)) void exp_inplace(T* x, int64_t n) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 8 <= n; j += 8) {
      f32x8& v = *reinterpret_cast<f32x8*>(x + j);
      v = expf_poly(v);
    }
    for (; j < n; ++j) x[j] = expf_poly(x[j]);
  } else {
    for (; j < n; ++j) x[j] = std::exp(x[j]);
  }
}

// s[c] = a . b[c] for the four rows b[c] = b + c * ldb: four accumulators hide the FMA latency.
template <typename T>
inline __attribute__((always_inline)) void dot4(const T* a, const T* b, int64_t ldb, int64_t n, T* s) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  const T *b0 = b, *b1 = b + ldb, *b2 = b + 2 * ldb, *b3 = b + 3 * ldb;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t d = 0; d < n; ++d) s0 += a[d] * b0[d], s1 += a[d] * b1[d], s2 += a[d] * b2[d], s3 += a[d] * b3[d];
  s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
}

template <typename T>
inline __attribute__((always_inline)) T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// s[j] = a . (row j of b) for j < count.
template <typename T>
inline __attribute__((always_inline)) void dots(const T* a, const T* b, int64_t ldb, int64_t count, int64_t n, T* s) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) dot4(a, b + j * ldb, ldb, n, s + j);
  for (; j < count; ++j) s[j] = dot(a, b + j * ldb, n);
}

// s[i][j] = (row i of a) . (row j of b), rows x cols, row stride cols. Two rows of a against four
// of b at a time: eight accumulators, six loads per eight multiply-adds.
template <typename T>
inline __attribute__((always_inline)) void row_products(const T* a, int64_t lda, int64_t rows, const T* b, int64_t ldb,
                                                        int64_t cols, int64_t n, T* s) {
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2) {
    const T *a0 = a + i * lda, *a1 = a0 + lda;
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) {
      const T *b0 = b + j * ldb, *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
      T s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
      for (int64_t d = 0; d < n; ++d) {
        s00 += a0[d] * b0[d], s01 += a0[d] * b1[d], s02 += a0[d] * b2[d], s03 += a0[d] * b3[d];
        s10 += a1[d] * b0[d], s11 += a1[d] * b1[d], s12 += a1[d] * b2[d], s13 += a1[d] * b3[d];
      }
      T* r0 = s + i * cols + j;
      T* r1 = r0 + cols;
      r0[0] = s00, r0[1] = s01, r0[2] = s02, r0[3] = s03, r1[0] = s10, r1[1] = s11, r1[2] = s12, r1[3] = s13;
    }
    for (; j < cols; ++j) {
      s[i * cols + j] = dot(a0, b + j * ldb, n);
      s[(i + 1) * cols + j] = dot(a1, b + j * ldb, n);
    }
  }
  for (; i < rows; ++i) dots(a + i * lda, b, ldb, cols, n, s + i * cols);
}

// y = sum_j w[j] * (row j of x), four rows a pass (y is loaded and stored count / 4 times); the
// first pass overwrites y.
template <typename T>
inline __attribute__((always_inline)) void combine(const T* w, const T* x, int64_t ldx, int64_t count, int64_t n, T* y) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const T w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
    const T *x0 = x + j * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    if (j) {
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) y[d] += (w0 * x0[d] + w1 * x1[d]) + (w2 * x2[d] + w3 * x3[d]);
    } else {
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) y[d] = (w0 * x0[d] + w1 * x1[d]) + (w2 * x2[d] + w3 * x3[d]);
    }
  }
  for (; j < count; ++j) {
    const T wj = w[j];
    const T* xj = x + j * ldx;
    if (j) {
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) y[d] += wj * xj[d];
    } else {
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) y[d] = wj * xj[d];
    }
  }
}

// Short groups (temporal attention): one group's L x L scores never reach a matrix product. Each
// query's scores are dot products of rows, its output a sum of rows: everything is read along the
// head dim, contiguous, and a group's few rows stay in L1. See kernels.h for the contract.
template <typename T>
inline __attribute__((always_inline)) void short_group_forward_impl(const ShortGroup<T>& g, T scale) {
  const int64_t L = g.length, Dh = g.head_dim;
  T scores[kShortGroup * kShortGroup];
  T row_max[kShortGroup];
  row_products(g.q, g.sq, L, g.k, g.sk, L, Dh, scores);
  for (int64_t i = 0; i < L; ++i) {
    T* s = scores + i * L;
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < L; ++j) m = std::max(m, s[j] * scale);  // a NaN logit may be skipped here ...
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) s[j] = s[j] * scale - m;
    row_max[i] = m;
  }
  exp_inplace(scores, L * L);  // the whole group at once: whole vectors whatever the frame count
  for (int64_t i = 0; i < L; ++i) {
    T* s = scores + i * L;
    const T m = row_max[i];
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < L; ++j) sum += s[j];  // ... but poisons the row here
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) s[j] *= inv;
    combine(s, g.v, g.sv, L, Dh, g.out + i * g.so);
    g.lse[i * g.sl] = m + std::log(sum);
  }
}

template <typename T>
inline __attribute__((always_inline)) void short_group_backward_impl(const ShortGroup<T>& g, T scale) {
  const int64_t L = g.length, Dh = g.head_dim;
  // P (then scale * P^T for dK's weights) and dS, row i for query i.
  T p[kShortGroup * kShortGroup], ds[kShortGroup * kShortGroup], column[kShortGroup];
  row_products(g.q, g.sq, L, g.k, g.sk, L, Dh, p);
  row_products(g.dout, g.sdo, L, g.v, g.sv, L, Dh, ds);
  for (int64_t i = 0; i < L; ++i) {
    const T lse = g.saved_lse[i * g.sl];
    T* pi = p + i * L;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) pi[j] = pi[j] * scale - lse;  // mutant: cpp-short-scale
  }
  exp_inplace(p, L * L);
  for (int64_t i = 0; i < L; ++i) {
    const T delta = dot(g.out + i * g.so, g.dout + i * g.sdo, Dh);
    const T* pi = p + i * L;
    T* dsi = ds + i * L;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) dsi[j] = pi[j] * (dsi[j] - delta);  // dS: gradient of the scaled logits
  }
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t i = 0; i < L; ++i) column[i] = p[i * L + j];
    combine(column, g.dout, g.sdo, L, Dh, g.dv + j * g.sdv);
    for (int64_t i = 0; i < L; ++i) column[i] = scale * ds[i * L + j];
    combine(column, g.q, g.sq, L, Dh, g.dk + j * g.sdk);
  }
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j = 0; j < L; ++j) column[j] = scale * ds[i * L + j];
    combine(column, g.k, g.sk, L, Dh, g.dq + i * g.sdq);
  }
}

// One butterfly step of a 16 x 16 transpose: rows i and i + D (i & D == 0) swap their off-diagonal
// D-wide blocks; the steps D = 8, 4, 2, 1 together move element (i, j) to (j, i).
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
  f32x8 sums{};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    f32x8& v = *reinterpret_cast<f32x8*>(x + j);
    v = expf_poly(v * scale - shift);  // mutant: cpp-exp-scale
    sums += v;
  }
  float sum = 0;
  for (int i = 0; i < 8; ++i) sum += sums[i];
  for (; j < n; ++j) {
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

VIVIT_CLONES void short_group_forward(const ShortGroup<float>& group, float scale) {
  short_group_forward_impl(group, scale);
}

void short_group_forward(const ShortGroup<double>& group, double scale) { short_group_forward_impl(group, scale); }

VIVIT_CLONES void short_group_backward(const ShortGroup<float>& group, float scale) {
  short_group_backward_impl(group, scale);
}

void short_group_backward(const ShortGroup<double>& group, double scale) { short_group_backward_impl(group, scale); }

}  // namespace vivit_kernels
