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
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define VIVIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// The 16-float short groups: compiled for AVX-512 alone (in the other clones GCC would spell out
// every 16-float select lane by lane, minutes of compile for code that never runs there).
#define VIVIT_AVX512 __attribute__((target("arch=x86-64-v4")))
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
inline __attribute__((always_inline)) f32x16 pow2_int(f32x16 n) {
  return (f32x16)((__builtin_convertvector(n, i32x16) + 127) << 23);
}

// exp(x) for finite x by x = n ln2 + r, |r| <= ln2 / 2: exp(x) = 2^n * p(r) (Cephes' coefficients),
// accurate to about 2 ulp. One body for a float and for 8 or 16 of them: the compiler does not
// vectorise a loop over the scalar form (its clamps become branches), so the loops call the vector
// form.
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

// Short groups (temporal attention): a group's few rows stay in L1 and every product is a register
// tile. The scores are kept transposed, s[j][i] for key j and query i, so that a vector holds the
// scores of several queries for one key: the softmax over the keys is then a max and a sum of
// whole vectors (no horizontal reductions), and each product below is one of rows of weights times
// rows of the head dim. Only q and dout are transposed (into L1 scratch) for it.

// The loops below take their vectors as a lane type: the vector V, its index vector (shuffles), the
// lanes, and unaligned loads and stores through the 4- (8-) byte-aligned typedefs named in it (as a
// template argument a vector type loses that attribute and the access would assume its alignment).
// 32-byte vectors, 8 floats or 4 doubles, everywhere: one ymm, whose selects AVX2 keeps as vector
// code. 16 floats, one zmm, where float_widths says: on Zen 4 (double-pumped AVX-512) a zmm
// multiply-adds at the rate of two ymm with half the instructions, and these loops are bound by
// their instruction stream, not by memory.
typedef double f64x4 __attribute__((vector_size(32), aligned(8), may_alias));
typedef int64_t i64x4 __attribute__((vector_size(32)));

struct Float8 {
  using T = float;
  using V = f32x8;
  using Index = i32x8;
  static constexpr int64_t width = 8;
  static constexpr bool streamed = false;
  static inline __attribute__((always_inline)) V load(const T* p) { return *reinterpret_cast<const f32x8*>(p); }
  static inline __attribute__((always_inline)) void store(T* p, V x) { *reinterpret_cast<f32x8*>(p) = x; }
  static inline __attribute__((always_inline)) V exp(V x) { return expf_poly(x); }
};
struct Float16 {
  using T = float;
  using V = f32x16;
  using Index = i32x16;
  static constexpr int64_t width = 16;
  static constexpr bool streamed = false;
  static inline __attribute__((always_inline)) V load(const T* p) { return *reinterpret_cast<const f32x16*>(p); }
  static inline __attribute__((always_inline)) void store(T* p, V x) { *reinterpret_cast<f32x16*>(p) = x; }
  static inline __attribute__((always_inline)) V exp(V x) { return expf_poly(x); }
};
// Float16 whose stores bypass the caches: whole 64-byte lines (every store must be aligned to
// one), so no line is read for ownership first. For the short groups' gradients, written once and
// read by no one in the call: their rows then need no prefetch either (see Ahead).
struct Float16Streamed : Float16 {
  static constexpr bool streamed = true;
  static inline __attribute__((always_inline)) void store(T* p, V x) {
    asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<V*>(p)) : "v"(x));
  }
};
struct Double4 {
  using T = double;
  using V = f64x4;
  using Index = i64x4;
  static constexpr int64_t width = 4;
  static constexpr bool streamed = false;
  static inline __attribute__((always_inline)) V load(const T* p) { return *reinterpret_cast<const f64x4*>(p); }
  static inline __attribute__((always_inline)) void store(T* p, V x) { *reinterpret_cast<f64x4*>(p) = x; }
  static inline __attribute__((always_inline)) V exp(V x) {
    for (int l = 0; l < 4; ++l) x[l] = std::exp(x[l]);
    return x;
  }
};

typedef double f64x8 __attribute__((vector_size(64), aligned(8), may_alias));
typedef int64_t i64x8 __attribute__((vector_size(64)));
// 8 doubles, one zmm: here pairs of floats, moved whole by the pair transpose below.
struct Double8 {
  using T = double;
  using V = f64x8;
  using Index = i64x8;
  static constexpr int64_t width = 8;
  static inline __attribute__((always_inline)) V load(const T* p) { return *reinterpret_cast<const f64x8*>(p); }
  static inline __attribute__((always_inline)) void store(T* p, V x) { *reinterpret_cast<f64x8*>(p) = x; }
};

// The vectors of a float short group: 16 floats where the CPU has AVX-512 (elsewhere a zmm is two
// ymm, and GCC makes scalar code of their selects) and the head dim is whole zmm (no column left to
// the one-by-one tails), for the products whose rows are head_dim wide always, and for the scores
// where the length pads no further to 16 than to 8 (T = 9-16 or 25-32; at T = 8 half of each score
// vector would be padding: there the score products go by paired_scores instead). One thread, 12
// heads of 64, forward+backward: T = 16 about 10% less time, T = 8 about 6%.
enum class Widths { all8, rows16, all16 };
inline Widths float_widths(int64_t length, int64_t head_dim) {
#ifdef VIVIT_AVX512
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  constexpr bool avx512 = false;
#endif
  if (!avx512 || head_dim % 16) return Widths::all8;
  return length % 16 == 0 || length % 16 > 8 ? Widths::all16 : Widths::rows16;
}

// A tile of rows x (CV vectors) of c = alpha * sum_p w(r, p) x[p], w(r, p) = w[r * w_row + p * w_inner]:
// the accumulators stay in registers over the whole inner loop, c is written once.
template <typename Lane, int R, int CV, typename T = typename Lane::T>
inline __attribute__((always_inline)) void weighted_rows_tile(int64_t inner, T alpha, const T* w, int64_t w_row,
                                                              int64_t w_inner, const T* x, int64_t ldx, T* c,
                                                              int64_t ldc) {
  using V = typename Lane::V;
  constexpr int64_t W = Lane::width;
  V acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < CV; ++v) acc[r][v] = V{};
  for (int64_t p = 0; p < inner; ++p) {
    V xv[CV];
    for (int v = 0; v < CV; ++v) xv[v] = Lane::load(x + p * ldx + v * W);
    for (int r = 0; r < R; ++r) {
      const T s = w[r * w_row + p * w_inner];
      for (int v = 0; v < CV; ++v) acc[r][v] += s * xv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < CV; ++v) Lane::store(c + r * ldc + v * W, alpha * acc[r][v]);
}

// Every row of one column block: tiles of R rows (more rows where the block is narrow, so each
// vector of x loaded feeds more multiply-adds), then the remaining rows 4, 2, 1 at a time.
template <typename Lane, int CV, typename T = typename Lane::T>
inline __attribute__((always_inline)) void weighted_rows_block(int64_t rows, int64_t inner, T alpha, const T* w,
                                                               int64_t w_row, int64_t w_inner, const T* x, int64_t ldx,
                                                               T* c, int64_t ldc) {
  constexpr int R = CV <= 2 ? 8 : 4;
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    weighted_rows_tile<Lane, R, CV>(inner, alpha, w + r * w_row, w_row, w_inner, x, ldx, c + r * ldc, ldc);
  if (R > 4 && r + 4 <= rows) {
    weighted_rows_tile<Lane, 4, CV>(inner, alpha, w + r * w_row, w_row, w_inner, x, ldx, c + r * ldc, ldc);
    r += 4;
  }
  if (r + 2 <= rows) {
    weighted_rows_tile<Lane, 2, CV>(inner, alpha, w + r * w_row, w_row, w_inner, x, ldx, c + r * ldc, ldc);
    r += 2;
  }
  if (r < rows) weighted_rows_tile<Lane, 1, CV>(inner, alpha, w + r * w_row, w_row, w_inner, x, ldx, c + r * ldc, ldc);
}

// c[r][:cols] = alpha * sum_{p < inner} w[r * w_row + p * w_inner] * x[p * ldx + :cols] for r < rows:
// rows of x weighted, every product of a short group. Columns go 4 vectors a block, then the
// whole vectors left, then the last cols % width one by one.
template <typename Lane, typename T = typename Lane::T>
inline __attribute__((always_inline)) void weighted_rows(int64_t rows, int64_t inner, int64_t cols, T alpha,
                                                         const T* w, int64_t w_row, int64_t w_inner, const T* x,
                                                         int64_t ldx, T* c, int64_t ldc) {
  constexpr int64_t W = Lane::width;
  int64_t c0 = 0;
  for (; c0 + 4 * W <= cols; c0 += 4 * W)
    weighted_rows_block<Lane, 4>(rows, inner, alpha, w, w_row, w_inner, x + c0, ldx, c + c0, ldc);
  switch ((cols - c0) / W) {
    case 3:
      weighted_rows_block<Lane, 3>(rows, inner, alpha, w, w_row, w_inner, x + c0, ldx, c + c0, ldc);
      c0 += 3 * W;
      break;
    case 2:
      weighted_rows_block<Lane, 2>(rows, inner, alpha, w, w_row, w_inner, x + c0, ldx, c + c0, ldc);
      c0 += 2 * W;
      break;
    case 1:
      weighted_rows_block<Lane, 1>(rows, inner, alpha, w, w_row, w_inner, x + c0, ldx, c + c0, ldc);
      c0 += W;
      break;
  }
  for (; c0 < cols; ++c0)
    for (int64_t r = 0; r < rows; ++r) {
      T sum = 0;
      for (int64_t p = 0; p < inner; ++p) sum += w[r * w_row + p * w_inner] * x[p * ldx + c0];
      c[r * ldc + c0] = alpha * sum;
    }
}

// One butterfly step of a W x W transpose (W = lanes): rows i and i + D (i & D == 0) swap their
// off-diagonal D-wide blocks; the steps D = W / 2, ..., 2, 1 together move (i, j) to (j, i).
template <int D, typename V, typename Index, size_t... e>
inline __attribute__((always_inline)) void butterfly(V* x, std::index_sequence<e...>) {
  constexpr int W = sizeof...(e);
  const Index low = {((e & D) ? int(W + (e ^ D)) : int(e))...};
  const Index high = {((e & D) ? int(W + e) : int(e ^ D))...};
  for (int i = 0; i < W; ++i)
    if (!(i & D)) {
      const V a = x[i], b = x[i + D];
      x[i] = __builtin_shuffle(a, b, low);
      x[i + D] = __builtin_shuffle(a, b, high);
    }
}

// dst[d * ldd + i] = src[i * lds + d] for i < rows, d < cols, and 0 for rows <= i < ldd (ldd a
// multiple of the lanes): W x W blocks by vector shuffles, the last cols % W columns one by one.
template <typename Lane, typename T = typename Lane::T>
inline __attribute__((always_inline)) void transpose_padded(const T* src, int64_t lds, int64_t rows, int64_t cols,
                                                            T* dst, int64_t ldd) {
  using V = typename Lane::V;
  using Index = typename Lane::Index;
  constexpr int64_t W = Lane::width;
  constexpr auto lanes = std::make_index_sequence<W>();
  const int64_t full = cols / W * W;
  for (int64_t i0 = 0; i0 < ldd; i0 += W) {
    const int64_t n = std::min(W, rows - i0);
    for (int64_t d0 = 0; d0 < full; d0 += W) {
      V x[W];
      if (n == W) {  // whole blocks without the per-row test
        for (int64_t i = 0; i < W; ++i) x[i] = Lane::load(src + (i0 + i) * lds + d0);
      } else {
        for (int64_t i = 0; i < W; ++i) x[i] = i < n ? Lane::load(src + (i0 + i) * lds + d0) : V{};
      }
      if constexpr (W == 16) butterfly<8, V, Index>(x, lanes);  // mutant: cpp-wide-transpose
      if constexpr (W >= 8) butterfly<4, V, Index>(x, lanes);
      butterfly<2, V, Index>(x, lanes);
      butterfly<1, V, Index>(x, lanes);
      for (int64_t d = 0; d < W; ++d) Lane::store(dst + (d0 + d) * ldd + i0, x[d]);
    }
    for (int64_t d = full; d < cols; ++d)
      for (int64_t i = 0; i < W; ++i) dst[d * ldd + i0 + i] = i < n ? src[(i0 + i) * lds + d] : T(0);
  }
}

// Scores of a group of at most 8 queries in 16-float vectors. Eight scores fill half a zmm, so
// the head dim is split between the halves of each pair of lanes: lane 2i + e sums query i's
// products over the elements of parity e. x (pair-transposed, see pair_transpose) has a row per
// pair of elements, x[p][2i + e] = q_i[2p + e]; each multiply-add takes w_r's pair p, broadcast as
// one double. c[r][i] = alpha * sum_d w_r[d] q_i[d], the two halves added at the end.
template <int R>
inline __attribute__((always_inline)) void paired_scores_tile(int64_t pairs, float alpha, const float* w,
                                                              int64_t w_row, const float* x, float* c,
                                                              int64_t ldc) {
  f32x16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = f32x16{};
  for (int64_t p = 0; p < pairs; ++p) {
    const f32x16 xv = *reinterpret_cast<const f32x16*>(x + 16 * p);
    for (int r = 0; r < R; ++r) {
      double pair;
      std::memcpy(&pair, w + r * w_row + 2 * p, sizeof pair);
      acc[r] += (f32x16)(f64x8{} + pair) * xv;
    }
  }
  for (int r = 0; r < R; ++r) {
    const f32x8 even = __builtin_shufflevector(acc[r], acc[r], 0, 2, 4, 6, 8, 10, 12, 14);
    const f32x8 odd = __builtin_shufflevector(acc[r], acc[r], 1, 3, 5, 7, 9, 11, 13, 15);
    *reinterpret_cast<f32x8*>(c + r * ldc) = alpha * (even + odd);  // mutant: cpp-paired-halves
  }
}

inline __attribute__((always_inline)) void paired_scores(int64_t rows, int64_t head_dim, float alpha, const float* w,
                                                         int64_t w_row, const float* x, float* c, int64_t ldc) {
  const int64_t pairs = head_dim / 2;
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) paired_scores_tile<8>(pairs, alpha, w + r * w_row, w_row, x, c + r * ldc, ldc);
  if (r + 4 <= rows) paired_scores_tile<4>(pairs, alpha, w + r * w_row, w_row, x, c + r * ldc, ldc), r += 4;
  if (r + 2 <= rows) paired_scores_tile<2>(pairs, alpha, w + r * w_row, w_row, x, c + r * ldc, ldc), r += 2;
  if (r < rows) paired_scores_tile<1>(pairs, alpha, w + r * w_row, w_row, x, c + r * ldc, ldc);
}

// dst[p][2i + e] = src[i * lds + 2p + e] for i < rows <= 8, 2p + e < cols, and 0 for rows <= i < 8:
// an 8 x cols/2 transpose of pairs of floats, moved as doubles.
inline __attribute__((always_inline)) void pair_transpose(const float* src, int64_t lds, int64_t rows, int64_t cols,
                                                          float* dst) {
  transpose_padded<Double8>(reinterpret_cast<const double*>(src), lds / 2, rows, cols / 2,
                            reinterpret_cast<double*>(dst), 8);
}

// Scratch of a thread for one short group: no allocation after the first.
template <typename T>
T* short_group_scratch(int64_t size) {
  thread_local std::vector<T> scratch;
  if (scratch.size() < size_t(size)) scratch.resize(size);
  return scratch.data();
}

// Prefetches of the next group's rows into L2, issued a share at a time between the steps of this
// group: issued all at once they fill the miss queues, and the products stall behind them.
template <typename T>
struct Ahead {
  const ShortGroup<T>& g;
  const int64_t total;  // rows, of every array
  int64_t issued = 0, row = 0;
  int array = 0;
  // The first `arrays` of the group's `next` (all by default).
  explicit Ahead(const ShortGroup<T>& group, int arrays = INT_MAX)
      : g(group), total(std::min(arrays, group.ahead) * group.length) {}
  // Up to share `part` of `parts` issued, a row's lines in one tight loop: a step per line, with
  // its three counters, cost T = 16 groups about 5% of their time.
  void upto(int part, int parts) {
    for (const int64_t end = total * part / parts; issued < end; ++issued) {
      const uintptr_t first = reinterpret_cast<uintptr_t>(g.next[array] + row * g.next_stride[array]);
      const uintptr_t last = first + g.head_dim * sizeof(T);
      for (uintptr_t line = first & ~uintptr_t(63); line < last; line += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(line), 0, 1);
      if (++row == g.length) row = 0, ++array;
    }
  }
};

// Scores go by paired_scores where their vectors are 8 floats beside 16-float rows (the AVX-512
// path, whose head dims are whole zmm), for groups of at most 8 whose transposed rows (q's, and
// dout's in the backward) are rows of pairs: starting on 8 bytes, an even number of floats apart.
template <typename Scores, typename Rows>
constexpr bool kPairedScores = std::is_same_v<Scores, Float8> && std::is_same_v<Rows, Float16>;
inline bool rows_of_pairs(const float* x, int64_t stride) {
  return reinterpret_cast<uintptr_t>(x) % 8 == 0 && stride % 2 == 0;
}

// See kernels.h for the contract. L queries and keys pad to Lp, a whole number of vectors; the
// padded queries (zero in the transposed q) are computed and never written. Scores: the lane type
// of the transposes and of the rows of Lp scores; Rows: of the products whose rows are head_dim
// wide (out; dv, dk, dq).
template <typename Scores, typename Rows, typename T = typename Scores::T>
inline __attribute__((always_inline)) void short_group_forward_impl(const ShortGroup<T>& g, T scale) {
  using V = typename Scores::V;
  constexpr int64_t W = Scores::width;
  const int64_t L = g.length, Dh = g.head_dim, Lp = (L + W - 1) / W * W;
  T* qt = short_group_scratch<T>(Dh * Lp + L * Lp);
  T* s = qt + Dh * Lp;  // s[j][i]: scaled logits, then probabilities, of query i for key j
  Ahead<T> ahead(g);
  ahead.upto(1, 4);
  bool paired = false;
  if constexpr (kPairedScores<Scores, Rows>) {
    if ((paired = Lp == 8 && rows_of_pairs(g.q, g.sq))) {
      pair_transpose(g.q, g.sq, L, Dh, qt);
      ahead.upto(2, 4);
      paired_scores(L, Dh, scale, g.k, g.sk, qt, s, Lp);
    }
  }
  if (!paired) {
    transpose_padded<Scores>(g.q, g.sq, L, Dh, qt, Lp);
    ahead.upto(2, 4);
    weighted_rows<Scores>(L, Dh, Lp, scale, g.k, g.sk, 1, qt, Lp, s, Lp);
  }
  ahead.upto(3, 4);
  for (int64_t i0 = 0; i0 < Lp; i0 += W) {
    V m = Scores::load(s + i0);
    for (int64_t j = 1; j < L; ++j) {
      const V x = Scores::load(s + j * Lp + i0);
      m = x > m ? x : m;  // a NaN logit may be skipped here ...
    }
    V sum{};
    for (int64_t j = 0; j < L; ++j) {
      const V e = Scores::exp(Scores::load(s + j * Lp + i0) - m);
      Scores::store(s + j * Lp + i0, e);
      sum += e;  // ... but poisons the column here
    }
    const V inv = T(1) / sum;
    for (int64_t j = 0; j < L; ++j) Scores::store(s + j * Lp + i0, Scores::load(s + j * Lp + i0) * inv);
    for (int64_t i = i0; i < std::min(L, i0 + W); ++i) g.lse[i * g.sl] = m[i - i0] + std::log(sum[i - i0]);
  }
  ahead.upto(4, 4);
  weighted_rows<Rows>(L, L, Dh, T(1), s, 1, Lp, g.v, g.sv, g.out, g.so);  // out_i = sum_j p[j][i] v_j
}

// FlashAttention-2's backward on one group, with delta_i = dout_i . out_i taken as the equal
// sum_j p_ij dp_ij of values at hand: out is not read.
// Grads: the lane type of the products into dv, dk, dq (Rows, or Rows with streamed stores).
template <typename Scores, typename Rows, typename Grads = Rows, typename T = typename Scores::T>
inline __attribute__((always_inline)) void short_group_backward_impl(const ShortGroup<T>& g, T scale) {
  using V = typename Scores::V;
  constexpr int64_t W = Scores::width;
  const int64_t L = g.length, Dh = g.head_dim, Lp = (L + W - 1) / W * W;
  T* qt = short_group_scratch<T>(2 * Dh * Lp + 2 * L * Lp);
  T* dot = qt + Dh * Lp;
  T* p = dot + Dh * Lp;  // p[j][i], then dp[j][i] = dout_i . v_j, then ds[j][i] (scaled logits' gradient)
  T* ds = p + L * Lp;
  Ahead<T> ahead(g, Grads::streamed ? kShortGroupInputs : INT_MAX);
  ahead.upto(1, 8);
  bool paired = false;
  if constexpr (kPairedScores<Scores, Rows>) {
    if ((paired = Lp == 8 && rows_of_pairs(g.q, g.sq) && rows_of_pairs(g.dout, g.sdo))) {
      pair_transpose(g.q, g.sq, L, Dh, qt);
      ahead.upto(2, 8);
      pair_transpose(g.dout, g.sdo, L, Dh, dot);
      ahead.upto(3, 8);
      paired_scores(L, Dh, scale, g.k, g.sk, qt, p, Lp);
      ahead.upto(4, 8);
      paired_scores(L, Dh, T(1), g.v, g.sv, dot, ds, Lp);
    }
  }
  if (!paired) {
    transpose_padded<Scores>(g.q, g.sq, L, Dh, qt, Lp);
    ahead.upto(2, 8);
    transpose_padded<Scores>(g.dout, g.sdo, L, Dh, dot, Lp);
    ahead.upto(3, 8);
    weighted_rows<Scores>(L, Dh, Lp, scale, g.k, g.sk, 1, qt, Lp, p, Lp);  // mutant: cpp-short-scale
    ahead.upto(4, 8);
    weighted_rows<Scores>(L, Dh, Lp, T(1), g.v, g.sv, 1, dot, Lp, ds, Lp);
  }
  ahead.upto(5, 8);
  for (int64_t i0 = 0; i0 < Lp; i0 += W) {
    V lse{}, delta{};
    for (int64_t i = i0; i < std::min(L, i0 + W); ++i) lse[i - i0] = g.saved_lse[i * g.sl];
    for (int64_t j = 0; j < L; ++j) {
      const V pj = Scores::exp(Scores::load(p + j * Lp + i0) - lse);
      Scores::store(p + j * Lp + i0, pj);
      delta += pj * Scores::load(ds + j * Lp + i0);
    }
    for (int64_t j = 0; j < L; ++j)
      Scores::store(ds + j * Lp + i0, Scores::load(p + j * Lp + i0) * (Scores::load(ds + j * Lp + i0) - delta));
  }
  ahead.upto(6, 8);
  weighted_rows<Grads>(L, L, Dh, T(1), p, Lp, 1, g.dout, g.sdo, g.dv, g.sdv);  // dv_j = sum_i p[j][i] dout_i
  ahead.upto(7, 8);
  weighted_rows<Grads>(L, L, Dh, scale, ds, Lp, 1, g.q, g.sq, g.dk, g.sdk);  // dk_j = scale sum_i ds[j][i] q_i
  ahead.upto(8, 8);
  weighted_rows<Grads>(L, L, Dh, scale, ds, 1, Lp, g.k, g.sk, g.dq, g.sdq);    // dq_i = scale sum_j ds[j][i] k_j
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

// src (rows x cols, row stride lds) transposed into the calling thread's scratch: cols x rows,
// row stride rows.
inline __attribute__((always_inline)) const float* transposed(const float* src, int64_t rows, int64_t cols,
                                                              int64_t lds) {
  thread_local std::vector<float> scratch;
  if (scratch.size() < size_t(rows * cols)) scratch.resize(rows * cols);
  float* dst = scratch.data();
  int64_t j0 = 0;
  if (cols % 16 == 0)
    for (; j0 + 16 <= rows; j0 += 16)
      for (int64_t p = 0; p < cols; p += 16) transpose16_f32(src + j0 * lds + p, lds, dst + p * rows + j0, rows);
  for (int64_t j = j0; j < rows; ++j)
    for (int64_t p = 0; p < cols; ++p) dst[p * rows + j] = src[j * lds + p];
  return dst;
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
  tiled_f32(m, n, k, alpha, a, sa_i, sa_p, transposed(b, n, k, ldb), n, c, ldc);
}

#ifdef CPUBLAS_BRGEMM_F32F32F32
VIVIT_CLONES void brgemm(bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                         int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  if (trans_b) b = transposed(b, n, k, ldb), ldb = n;
  // As BLAS, oneDNN wants leading dims at least the row length, even for a single row.
  lda = std::max(lda, k), ldb = std::max(ldb, n), ldc = std::max(ldc, n);
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}
#endif

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

namespace {

// The body of exp_sum, inlined into each clone of its callers.
inline __attribute__((always_inline)) float exp_sum_impl(float* x, int64_t n, float scale, float shift) {
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

inline double exp_sum_impl(double* x, int64_t n, double scale, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] * scale - shift);
    sum += x[j];
  }
  return sum;
}

inline __attribute__((always_inline)) void softmax_grad_cols_impl(float* pt, float* dpt, int64_t n, int64_t m,
                                                                  float scale, const float* lse, const float* delta) {
  for (int64_t j = 0; j < n; ++j) {
    float* p = pt + j * m;
    float* dp = dpt + j * m;
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
      f32x8& pv = *reinterpret_cast<f32x8*>(p + i);
      f32x8& dv = *reinterpret_cast<f32x8*>(dp + i);
      pv = expf_poly(pv * scale - *reinterpret_cast<const f32x8*>(lse + i));
      dv = pv * (dv - *reinterpret_cast<const f32x8*>(delta + i)) * scale;  // mutant: cpp-ds-scale
    }
    for (; i < m; ++i) {
      p[i] = expf_poly(p[i] * scale - lse[i]);
      dp[i] = p[i] * (dp[i] - delta[i]) * scale;
    }
  }
}

inline void softmax_grad_cols_impl(double* pt, double* dpt, int64_t n, int64_t m, double scale, const double* lse,
                                   const double* delta) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      double& p = pt[j * m + i];
      p = std::exp(p * scale - lse[i]);
      dpt[j * m + i] = p * (dpt[j * m + i] - delta[i]) * scale;
    }
}

template <typename T>
inline __attribute__((always_inline)) void divide_rows_impl(T* x, int64_t m, int64_t n, int64_t ld, const T* by) {
  for (int64_t i = 0; i < m; ++i) {
    T* xi = x + i * ld;
    const T inv = T(1) / by[i];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) xi[j] *= inv;
  }
}

}  // namespace

VIVIT_CLONES float exp_sum(float* x, int64_t n, float scale, float shift) { return exp_sum_impl(x, n, scale, shift); }

double exp_sum(double* x, int64_t n, double scale, double shift) { return exp_sum_impl(x, n, scale, shift); }

VIVIT_CLONES void softmax_grad_cols(float* pt, float* dpt, int64_t n, int64_t m, float scale, const float* lse,
                                    const float* delta) {
  softmax_grad_cols_impl(pt, dpt, n, m, scale, lse, delta);
}

void softmax_grad_cols(double* pt, double* dpt, int64_t n, int64_t m, double scale, const double* lse,
                       const double* delta) {
  softmax_grad_cols_impl(pt, dpt, n, m, scale, lse, delta);
}

VIVIT_CLONES void divide_rows(float* x, int64_t m, int64_t n, int64_t ld, const float* by) {
  divide_rows_impl(x, m, n, ld, by);
}

void divide_rows(double* x, int64_t m, int64_t n, int64_t ld, const double* by) { divide_rows_impl(x, m, n, ld, by); }

#ifdef VIVIT_AVX512
static VIVIT_AVX512 void short_group_forward_avx512(const ShortGroup<float>& group, float scale, Widths widths) {
  if (widths == Widths::all16)
    short_group_forward_impl<Float16, Float16>(group, scale);
  else
    short_group_forward_impl<Float8, Float16>(group, scale);
}
#endif

VIVIT_CLONES void short_group_forward(const ShortGroup<float>& group, float scale) {
  const Widths widths = float_widths(group.length, group.head_dim);
#ifdef VIVIT_AVX512
  if (widths != Widths::all8) return short_group_forward_avx512(group, scale, widths);
#endif
  short_group_forward_impl<Float8, Float8>(group, scale);
}

void short_group_forward(const ShortGroup<double>& group, double scale) {
  short_group_forward_impl<Double4, Double4>(group, scale);
}

#ifdef VIVIT_AVX512
// Whether rows of x (the stride apart) start on 64-byte lines, as streamed stores need.
static bool on_lines(const float* x, int64_t stride) {
  return reinterpret_cast<uintptr_t>(x) % 64 == 0 && stride % 16 == 0;
}

static VIVIT_AVX512 void short_group_backward_avx512(const ShortGroup<float>& group, float scale, Widths widths) {
  // Streamed where every gradient's rows lie on lines (the head dim a multiple of 16 and the
  // tensors as allocated): one thread, 12 heads of 64, about 6% less backward time at T = 16,
  // level at T = 8.
  if (on_lines(group.dq, group.sdq) && on_lines(group.dk, group.sdk) && on_lines(group.dv, group.sdv)) {
    if (widths == Widths::all16)
      short_group_backward_impl<Float16, Float16, Float16Streamed>(group, scale);
    else
      short_group_backward_impl<Float8, Float16, Float16Streamed>(group, scale);
    return;
  }
  if (widths == Widths::all16)
    short_group_backward_impl<Float16, Float16>(group, scale);
  else
    short_group_backward_impl<Float8, Float16>(group, scale);
}
#endif

VIVIT_CLONES void short_group_backward(const ShortGroup<float>& group, float scale) {
  const Widths widths = float_widths(group.length, group.head_dim);
#ifdef VIVIT_AVX512
  if (widths != Widths::all8) return short_group_backward_avx512(group, scale, widths);
#endif
  short_group_backward_impl<Float8, Float8>(group, scale);
}

void short_group_backward(const ShortGroup<double>& group, double scale) {
  short_group_backward_impl<Double4, Double4>(group, scale);
}

void fence_streamed_stores() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  asm volatile("sfence" ::: "memory");
#endif
}

}  // namespace vivit_kernels
