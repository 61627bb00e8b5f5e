// Factorised attention on CPU, flash style: for each block of queries, the keys of its group are
// visited block by block with an online softmax, so no (tokens x group length) matrix is ever
// stored; the forward saves only the row log-sum-exp, and the backward recomputes the
// probabilities from it (FlashAttention-2: delta = rowsum(dO * O), then dV, dK, dQ).
//
// Every mode is one kernel: a head's tokens fall into `groups` groups of `length` tokens, group g
// holding tokens g * group_stride + i * step. Spatial: T groups of S consecutive tokens; temporal:
// S groups of T tokens S apart; joint: one group of all N; split: spatial heads then temporal
// heads, all in one parallel loop. A block of a group's tokens is then a matrix whose row stride
// is `step` tokens, which BLAS (or the small loops in kernels.h) reads in place: q, k, v are read
// through their strides, packed-qkv views included, and never copied.

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace vivit_kernels {
namespace {

// Rows of a query block and of a key block. The scores of one pair of blocks (up to 256 x 512
// floats, 512 KiB) stay in L2; wide key blocks make fewer, larger BLAS calls for long groups.
constexpr int64_t kMaxBlock = 256, kMaxKeyBlock = 512;
constexpr double kMinCostPerThread = 1 << 20;  // in multiply-adds

struct Grouping {
  int64_t groups, length, step, group_stride;
};

Grouping grouping(c10::string_view mode, int64_t head, int64_t heads, int64_t frames, int64_t spatial) {
  if (mode == "split") mode = head < heads / 2 ? "spatial" : "temporal";
  if (mode == "joint") return {1, frames * spatial, 1, 0};
  if (mode == "spatial") return {frames, spatial, 1, spatial};
  TORCH_CHECK(mode == "temporal", "factorised_attention: unknown mode '", mode, "'");
  return {spatial, frames, spatial, 1};
}

// Runs of heads that share a grouping. Work items go group by group, every head of a run in turn:
// one token's heads sit side by side in memory, so 8-token temporal groups read whole cache lines.
std::vector<std::pair<int64_t, int64_t>> head_ranges(c10::string_view mode, int64_t heads) {
  if (mode == "split") return {{0, heads / 2}, {heads / 2, heads}};
  return {{0, heads}};
}

// Equal blocks of at most `max_rows` rows (196 -> one block, 1568 -> 7 blocks of 224).
int64_t block_size(int64_t length, int64_t max_rows = kMaxBlock) {
  const int64_t blocks = (length + max_rows - 1) / max_rows;
  return (length + blocks - 1) / blocks;
}

// A (B, H, N, Dh) tensor as a pointer and strides in elements; rows of Dh are contiguous.
template <typename T>
struct View {
  T* data;
  int64_t sb, sh, sn;
  View(const at::Tensor& x) : data(x.data_ptr<T>()), sb(x.stride(0)), sh(x.stride(1)), sn(x.stride(2)) {}
  T* row(int64_t b, int64_t h, int64_t n) const { return data + b * sb + h * sh + n * sn; }
};

// Groups g .. g + groups - 1 of head h: short (temporal) groups go 16 to an item, so an item's
// log-sum-exp entries fill whole cache lines and the per-item costs are shared.
struct WorkItem {
  int64_t b, h, g, groups, first_row, rows;
  double cost;
};

constexpr int64_t kShortGroup = 32, kShortGroupsPerItem = 16;

int64_t groups_per_item(const Grouping& grp) { return grp.length <= kShortGroup ? kShortGroupsPerItem : 1; }

// Runs every item once. Threads take the next item from a shared counter rather than fixed shares:
// "split" mixes heavy spatial groups with light temporal ones, and on a busy machine one thread may
// get less of a core than another. Items come heaviest first where it matters (spatial heads).
template <typename F>
void run_items(const std::vector<WorkItem>& items, const F& body) {
  double total = 0;
  for (const auto& item : items) total += item.cost;
  // Small calls run on the calling thread: waking a busy machine's threads costs more than they save.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({int64_t(at::get_num_threads()),
                                                                 int64_t(items.size()), int64_t(total / kMinCostPerThread)}));
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (size_t i = next++; i < items.size(); i = next++) body(items[i]);
  });
}

template <typename T>
void forward_kernel(const View<T>& q, const View<T>& k, const View<T>& v, T* out, T* lse, int64_t B, int64_t H,
                    int64_t frames, int64_t spatial, int64_t Dh, c10::string_view mode, T scale) {
  const int64_t N = frames * spatial;
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < B; ++b)
    for (auto [h0, h1] : head_ranges(mode, H)) {
      const Grouping grp = grouping(mode, h0, H, frames, spatial);
      const int64_t blk = block_size(grp.length);
      const int64_t run = groups_per_item(grp);
      for (int64_t g = 0; g < grp.groups; g += run)
        for (int64_t i0 = 0; i0 < grp.length; i0 += blk)
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t rows = std::min(blk, grp.length - i0), groups = std::min(run, grp.groups - g);
            items.push_back({b, h, g, groups, i0, rows, 2.0 * groups * rows * (grp.length + 8) * Dh});
          }
    }
  run_items(items, [&](const WorkItem& work) {
    thread_local std::vector<T> scores, acc, row_max, row_sum;
    scores.resize(kMaxBlock * kMaxKeyBlock), acc.resize(kMaxBlock * Dh), row_max.resize(kMaxBlock), row_sum.resize(kMaxBlock);
    for (int64_t g = work.g; g < work.g + work.groups; ++g) {
      const WorkItem* item = &work;
      const int64_t b = item->b, h = item->h, M = item->rows;
      const Grouping grp = grouping(mode, h, H, frames, spatial);
      const int64_t key_blk = block_size(grp.length, kMaxKeyBlock);
      const int64_t first = g * grp.group_stride + item->first_row * grp.step;
      const T* Q = q.row(b, h, first);
      std::fill(row_max.begin(), row_max.begin() + M, -std::numeric_limits<T>::infinity());
      std::fill(row_sum.begin(), row_sum.begin() + M, T(0));
      std::fill(acc.begin(), acc.begin() + M * Dh, T(0));
      for (int64_t j0 = 0; j0 < grp.length; j0 += key_blk) {
        const int64_t Nb = std::min(key_blk, grp.length - j0);
        const int64_t key = g * grp.group_stride + j0 * grp.step;
        gemm<T>(false, true, M, Nb, Dh, T(1), Q, grp.step * q.sn, k.row(b, h, key), grp.step * k.sn, T(0),
                scores.data(), Nb);
        // Online softmax: rescale what was accumulated under the old running max.
        for (int64_t i = 0; i < M; ++i) {
          T* s = scores.data() + i * Nb;
          const T m = std::max(row_max[i], scaled_max(s, Nb, scale));  // a NaN logit may be skipped here ...
          const T sum = exp_sum(s, Nb, scale, m);                          // ... but poisons the row here
          const T correction = std::exp(row_max[i] - m);
          row_sum[i] = row_sum[i] * correction + sum;
          row_max[i] = m;
          if (correction != T(1))
            for (int64_t d = 0; d < Dh; ++d) acc[i * Dh + d] *= correction;
        }
        gemm<T>(false, false, M, Dh, Nb, T(1), scores.data(), Nb, v.row(b, h, key), grp.step * v.sn, T(1), acc.data(),
                Dh);
      }
      for (int64_t i = 0; i < M; ++i) {
        const int64_t n = first + i * grp.step;
        T* o = out + ((b * N + n) * H + h) * Dh;  // (B, N, H, Dh)
        const T inv = T(1) / row_sum[i];
        for (int64_t d = 0; d < Dh; ++d) o[d] = acc[i * Dh + d] * inv;
        lse[(b * H + h) * N + n] = row_max[i] + std::log(row_sum[i]);
      }
    }
  });
}

template <typename T>
void backward_kernel(const View<T>& dout, const View<T>& q, const View<T>& k, const View<T>& v, const View<T>& out,
                     const T* lse, const View<T>& dq, const View<T>& dk, const View<T>& dv, int64_t B, int64_t H, int64_t frames, int64_t spatial,
                     int64_t Dh, c10::string_view mode, T scale) {
  const int64_t N = frames * spatial;
  // One item per group: it alone writes the group's rows of dq, dk, dv, so no reduction is needed.
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < B; ++b)
    for (auto [h0, h1] : head_ranges(mode, H)) {
      const Grouping grp = grouping(mode, h0, H, frames, spatial);
      const int64_t run = groups_per_item(grp);
      for (int64_t g = 0; g < grp.groups; g += run)
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t groups = std::min(run, grp.groups - g);
          items.push_back({b, h, g, groups, 0, grp.length, 5.0 * groups * grp.length * (grp.length + 8) * Dh});
        }
    }
  run_items(items, [&](const WorkItem& work) {
    thread_local std::vector<T> probs, dprobs, delta;
    probs.resize(kMaxBlock * kMaxBlock), dprobs.resize(kMaxBlock * kMaxBlock), delta.resize(kMaxBlock);
    for (int64_t g = work.g; g < work.g + work.groups; ++g) {
      const WorkItem* item = &work;
      const int64_t b = item->b, h = item->h;
      const Grouping grp = grouping(mode, h, H, frames, spatial);
      // Square blocks: the backward keeps two score-sized blocks (probabilities and their gradient).
      const int64_t blk = block_size(grp.length), key_blk = blk;
      const int64_t first = g * grp.group_stride, step = grp.step;
      for (int64_t i0 = 0; i0 < grp.length; i0 += blk) {
        const int64_t M = std::min(blk, grp.length - i0), qn = first + i0 * step;
        const T* Q = q.row(b, h, qn);
        const T* dO = dout.row(b, h, qn);
        for (int64_t i = 0; i < M; ++i) {
          const T* o = out.row(b, h, qn + i * step);
          const T* dout_row = dO + i * step * dout.sn;
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t d = 0; d < Dh; ++d) sum += o[d] * dout_row[d];
          delta[i] = sum;
        }
        const T* row_lse = lse + (b * H + h) * N;
        for (int64_t j0 = 0; j0 < grp.length; j0 += key_blk) {
          const int64_t Nb = std::min(key_blk, grp.length - j0), kn = first + j0 * step;
          const T* K = k.row(b, h, kn);
          gemm<T>(false, true, M, Nb, Dh, T(1), Q, step * q.sn, K, step * k.sn, T(0), probs.data(), Nb);
          gemm<T>(false, true, M, Nb, Dh, T(1), dO, step * dout.sn, v.row(b, h, kn), step * v.sn, T(0),
                  dprobs.data(), Nb);
          for (int64_t i = 0; i < M; ++i) {
            const T l = row_lse[qn + i * step], di = delta[i];
            T* p = probs.data() + i * Nb;
            T* dp = dprobs.data() + i * Nb;
            exp_sum(p, Nb, scale, l);
            for (int64_t j = 0; j < Nb; ++j) dp[j] = p[j] * (dp[j] - di);  // dS: gradient of the scaled logits
          }
          // The first block to reach a row of dk, dv (i0 == 0) or dq (j0 == 0) overwrites it: no zero fill.
          const T dkv_beta = i0 == 0 ? T(0) : T(1), dq_beta = j0 == 0 ? T(0) : T(1);
          gemm<T>(true, false, Nb, Dh, M, T(1), probs.data(), Nb, dO, step * dout.sn, dkv_beta, dv.row(b, h, kn),
                  step * dv.sn);
          gemm<T>(true, false, Nb, Dh, M, scale, dprobs.data(), Nb, Q, step * q.sn, dkv_beta, dk.row(b, h, kn),
                  step * dk.sn);
          gemm<T>(false, false, M, Dh, Nb, scale, dprobs.data(), Nb, K, step * k.sn, dq_beta, dq.row(b, h, qn),
                  step * dq.sn);
        }
      }
    }
  });
}

// Rows of Dh must be contiguous for BLAS; anything else (rare) is copied once.
at::Tensor rows_contiguous(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t frames) {
  for (const auto* x : {&q, &k, &v}) {
    TORCH_CHECK(x->dim() == 4 && x->sizes() == q.sizes(), "factorised_attention: q, k, v must be (B, H, N, Dh)");
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == q.scalar_type(),
                "factorised_attention: q, k, v must be CPU tensors of one dtype");
  }
  TORCH_CHECK(frames >= 1 && q.size(2) % frames == 0, "factorised_attention: N must be divisible by frames");
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, int64_t frames,
                                           c10::string_view mode, double scale) {
  check_inputs(q_, k_, v_, frames);
  const at::Tensor q = rows_contiguous(q_), k = rows_contiguous(k_), v = rows_contiguous(v_);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dh = q.size(3);
  // (B, N, H, Dh): the layout the output projection reads; returned as a (B, H, N, Dh) view.
  at::Tensor out = at::empty({B, N, H, Dh}, q.options());
  at::Tensor lse = at::empty({B, H, N}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "vivit_kernels::cpu_attention_forward", [&] {
    forward_kernel<scalar_t>(View<scalar_t>(q), View<scalar_t>(k), View<scalar_t>(v), out.data_ptr<scalar_t>(),
                             lse.data_ptr<scalar_t>(), B, H, frames, N / frames, Dh, mode, scalar_t(scale));
  });
  return {out.transpose(1, 2), lse};
}

// Writes dq, dk, dv (B, H, N, Dh views; rows of Dh contiguous) in full.
void backward_into(const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                   const at::Tensor& out_, const at::Tensor& lse_, int64_t frames, c10::string_view mode, double scale,
                   const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  check_inputs(q_, k_, v_, frames);
  check_inputs(grad_out_, out_, q_, frames);
  const at::Tensor q = rows_contiguous(q_), k = rows_contiguous(k_), v = rows_contiguous(v_);
  const at::Tensor grad_out = rows_contiguous(grad_out_), out = rows_contiguous(out_), lse = lse_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dh = q.size(3);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, N}) && lse.scalar_type() == q.scalar_type(),
              "factorised_attention: lse must be (B, H, N) in q's dtype");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "vivit_kernels::cpu_attention_backward", [&] {
    backward_kernel<scalar_t>(View<scalar_t>(grad_out), View<scalar_t>(q), View<scalar_t>(k), View<scalar_t>(v),
                              View<scalar_t>(out), lse.data_ptr<scalar_t>(), View<scalar_t>(dq), View<scalar_t>(dk),
                              View<scalar_t>(dv), B, H, frames, N / frames, Dh, mode, scalar_t(scale));
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     int64_t frames, c10::string_view mode, double scale) {
  return forward(q, k, v, frames, mode, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t frames, c10::string_view mode, double scale) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dh = q.size(3);
  // The layout of out: (B, H, N, Dh) views of (B, N, H, Dh) buffers.
  at::Tensor dq = at::empty({B, N, H, Dh}, q.options()).transpose(1, 2);
  at::Tensor dk = at::empty({B, N, H, Dh}, q.options()).transpose(1, 2);
  at::Tensor dv = at::empty({B, N, H, Dh}, q.options()).transpose(1, 2);
  backward_into(grad_out, q, k, v, out, lse, frames, mode, scale, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace vivit_kernels
