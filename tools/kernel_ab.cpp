// tools/kernel_ab.py's program: two builds of the short-group kernels (csrc/block_math.cpp) timed
// against each other in one process. Compiled three times:
//   -DKERNEL_AB_SIDE=a -Dvivit_kernels=vivit_kernels_a -I<side a's csrc>  (and likewise b): the
//     loops attention.cpp runs over temporal groups, on that side's kernels, as kernel_ab_<side>_*;
//   -DKERNEL_AB_MAIN: allocates one clip, runs both sides, checks they agree, times them.
// Timing as benchmarks/cpu_ratios.py times a call (process CPU time, minimum over rounds, the
// sides taking turns, first side alternating), with the caches flushed before every call so that
// each starts from memory as a layer's attention does.

#include <cstdint>

// One clip's temporal attention, time-major (token n = frame * S + position), 12 heads of 64 at
// ViViT-B: qkv (N, 3 * H * Dh) as a layer's projection packs it, out and dout (N, H * Dh), lse (H, N).
struct Clip {
  int64_t frames, positions, heads, head_dim;
  float *qkv, *out, *lse, *dout, *dqkv;
};

#define KERNEL_AB_CAT2(a, b) a##b
#define KERNEL_AB_CAT(a, b) KERNEL_AB_CAT2(a, b)

#ifdef KERNEL_AB_SIDE
#include <cmath>

#include "kernels.h"

namespace {

using Group = vivit_kernels::ShortGroup<float>;

// Group g (a position) of head h, its rows `frames * positions` apart as attention.cpp sets them;
// `next`: the same head's rows of the next group, prefetched while this one computes.
Group group(const Clip& c, int64_t g, int64_t h, bool backward) {
  const int64_t row = 3 * c.heads * c.head_dim, out_row = c.heads * c.head_dim, step = c.positions;
  Group x{};
  x.length = c.frames, x.head_dim = c.head_dim;
  x.q = c.qkv + g * row + h * c.head_dim, x.k = x.q + out_row, x.v = x.k + out_row;
  x.sq = x.sk = x.sv = step * row;
  x.sl = step;
  const bool last = g + 1 == c.positions;
  if (!backward) {
    x.out = c.out + g * out_row + h * c.head_dim, x.so = step * out_row;
    x.lse = c.lse + h * c.frames * c.positions + g;
    if (!last) {
      for (const float* a : {x.q, x.k, x.v}) x.next[x.ahead] = a + row, x.next_stride[x.ahead++] = x.sq;
      x.next[x.ahead] = x.out + out_row, x.next_stride[x.ahead++] = x.so;
    }
    return x;
  }
  x.saved_lse = c.lse + h * c.frames * c.positions + g;
  x.dout = c.dout + g * out_row + h * c.head_dim, x.sdo = step * out_row;
  x.dq = c.dqkv + g * row + h * c.head_dim, x.dk = x.dq + out_row, x.dv = x.dk + out_row;
  x.sdq = x.sdk = x.sdv = step * row;
  if (!last) {  // the inputs first, as attention.cpp orders them
    for (const float* a : {x.q, x.k, x.v}) x.next[x.ahead] = a + row, x.next_stride[x.ahead++] = x.sq;
    x.next[x.ahead] = x.dout + out_row, x.next_stride[x.ahead++] = x.sdo;
    for (const float* a : {x.dq, x.dk, x.dv}) x.next[x.ahead] = a + row, x.next_stride[x.ahead++] = x.sdq;
  }
  return x;
}

}  // namespace

extern "C" void KERNEL_AB_CAT(kernel_ab_forward_, KERNEL_AB_SIDE)(const Clip* c) {
  const float scale = 1.0f / std::sqrt(float(c->head_dim));
  for (int64_t g = 0; g < c->positions; ++g)
    for (int64_t h = 0; h < c->heads; ++h) vivit_kernels::short_group_forward(group(*c, g, h, false), scale);
}

extern "C" void KERNEL_AB_CAT(kernel_ab_backward_, KERNEL_AB_SIDE)(const Clip* c) {
  const float scale = 1.0f / std::sqrt(float(c->head_dim));
  for (int64_t g = 0; g < c->positions; ++g)
    for (int64_t h = 0; h < c->heads; ++h) vivit_kernels::short_group_backward(group(*c, g, h, true), scale);
  vivit_kernels::fence_streamed_stores();
}
#endif

#ifdef KERNEL_AB_MAIN
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <new>
#include <random>
#include <vector>

extern "C" void kernel_ab_forward_a(const Clip*);
extern "C" void kernel_ab_backward_a(const Clip*);
extern "C" void kernel_ab_forward_b(const Clip*);
extern "C" void kernel_ab_backward_b(const Clip*);

namespace {

double cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

// On 64-byte lines, as torch's CPU allocator puts tensors (and so the kernels' streamed-store
// paths are the ones a library call takes); a std::vector's large buffers start 16 bytes past a page.
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const LineAligned&) const { return true; }
};
using Buffer = std::vector<float, LineAligned<float>>;

Buffer randn(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  Buffer x(n);
  for (auto& v : x) v = normal(rng);
  return x;
}

double max_difference(const Buffer& a, const Buffer& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, double(std::fabs(a[i] - b[i])));
  return d;
}

}  // namespace

// kernel_ab FRAMES POSITIONS HEADS HEAD_DIM ROUNDS: one line,
// "forward_a backward_a forward_b backward_b out_difference grad_difference" (ms; max |a - b|).
int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: kernel_ab FRAMES POSITIONS HEADS HEAD_DIM ROUNDS\n");
    return 2;
  }
  const int64_t T = atol(argv[1]), S = atol(argv[2]), H = atol(argv[3]), Dh = atol(argv[4]);
  const int rounds = atoi(argv[5]);
  const int64_t N = T * S;
  std::mt19937 rng(0);
  Buffer qkv = randn(N * 3 * H * Dh, rng), dout = randn(N * H * Dh, rng);
  Buffer out(N * H * Dh), lse(H * N), dqkv(N * 3 * H * Dh);
  const Clip clip{T, S, H, Dh, qkv.data(), out.data(), lse.data(), dout.data(), dqkv.data()};
  void (*forward[2])(const Clip*) = {kernel_ab_forward_a, kernel_ab_forward_b};
  void (*backward[2])(const Clip*) = {kernel_ab_backward_a, kernel_ab_backward_b};

  Buffer outs[2], grads[2];
  for (int side = 0; side < 2; ++side) {
    forward[side](&clip);
    outs[side] = out;
    backward[side](&clip);  // on this side's own log-sum-exps
    grads[side] = dqkv;
  }
  // More than the last-level cache of the machines this runs on: every call starts from memory.
  std::vector<float> flush(16 << 20);
  double best[2][2] = {{1e30, 1e30}, {1e30, 1e30}};
  for (int r = 0; r < rounds; ++r)
    for (int turn = 0; turn < 2; ++turn) {
      const int side = (turn + r) % 2;
      for (int pass = 0; pass < 2; ++pass) {
        std::fill(flush.begin(), flush.end(), float(r + pass));
        const double start = cpu_ms();
        (pass ? backward : forward)[side](&clip);
        best[side][pass] = std::min(best[side][pass], cpu_ms() - start);
      }
    }
  std::printf("%.4f %.4f %.4f %.4f %.3g %.3g\n", best[0][0], best[0][1], best[1][0], best[1][1],
              max_difference(outs[0], outs[1]), max_difference(grads[0], grads[1]));
  return 0;
}
#endif
