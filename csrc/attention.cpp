// Factorised attention on CPU, flash style: for each block of queries, the keys of its group are
// visited block by block with an online softmax, so no (tokens x group length) matrix is ever
// stored; the forward saves only the row log-sum-exp, and the backward recomputes the
// probabilities from it (FlashAttention-2: delta = rowsum(dO * O), then dV, dK, dQ).
//
// Every mode is one kernel: a head's tokens fall into `groups` groups of `length` tokens, group g
// holding tokens base + g * group_stride + i * member_stride (base: the P prefix tokens before the
// grid): an IndexMap, with the fields, order and values of vivit_kernels/index_map.py.
// Spatial: T groups of S tokens of one frame; temporal: S groups of the T tokens of one position;
// joint: one group of all N; split: spatial heads then temporal heads, all in one parallel loop.
// The token layout (time- or space-major) only changes the two strides. A spatial group also
// holds the prefix tokens, as queries and as keys: a grid query sees them, and a prefix query
// attends to each frame's group in turn; those per-frame outputs are averaged afterwards, and in
// backward the prefix rows' gradients of each group are summed afterwards (partials per group:
// no group writes another's rows, so nothing is reduced across threads). In temporal heads the
// prefix tokens form one more group of their own. A block of a group's tokens is a matrix whose
// row stride is `member_stride` tokens, which the products (kernels.h's gemm) read in place: q,
// k, v are read through their strides, packed-qkv views included, and never copied whole (the
// thin operand of a product that needs it transposed, a block of keys, values or queries, and a
// short group's q and output gradient are transposed into a few KB of scratch).

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <array>
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

struct IndexMap {
  int64_t groups, length, group_stride, member_stride, base;
  int64_t prefix;  // prefix tokens [0, prefix) that every group also holds (spatial heads), else 0
};

// A block of tokens of a (B, H, N, Dh) view: `count` tokens from `first`, `step` tokens apart.
struct Rows {
  int64_t first, count, step;
};

// The index maps of one head: its grid groups, and in temporal heads the prefix on its own.
std::vector<IndexMap> index_maps(c10::string_view mode, c10::string_view layout, int64_t frames,
                                 int64_t tokens_per_frame, int64_t prefix) {
  const bool time_major = layout == "time_major";
  TORCH_CHECK(time_major || layout == "space_major", "factorised_attention: unknown layout '", layout, "'");
  const int64_t T = frames, S = tokens_per_frame, P = prefix;
  if (mode == "joint") return {{1, P + T * S, 0, 1, 0, 0}};
  if (mode == "spatial")
    return {time_major ? IndexMap{T, S, S, 1, P, P} : IndexMap{T, S, 1, T, P, P}};  // mutant: cpp-space-major
  TORCH_CHECK(mode == "temporal", "factorised_attention: unknown mode '", mode, "'");
  std::vector<IndexMap> out = {time_major ? IndexMap{S, T, 1, S, P, 0} : IndexMap{S, T, T, 1, P, 0}};
  if (P) out.push_back({1, P, 0, 1, 0, 0});  // mutant: cpp-prefix-group
  return out;
}

// Runs of heads that share a mode. Work items go group by group, every head of a run in turn:
// one token's heads sit side by side in memory. A temporal group of one head is T rows of Dh a
// frame apart (S tokens: past a page, rows the prefetchers do not follow), while all heads of
// one position are T whole rows of the projection, read in order.
struct HeadRange {
  int64_t h0, h1;
  c10::string_view mode;
};

std::vector<HeadRange> head_ranges(c10::string_view mode, int64_t heads) {
  if (mode == "split") return {{0, heads / 2, "spatial"}, {heads / 2, heads, "temporal"}};
  return {{0, heads, mode}};
}

// The heads whose prefix queries attend frame by frame (averaged): the spatial ones, [0, Ha).
int64_t averaged_heads(c10::string_view mode, int64_t heads, int64_t prefix) {
  if (!prefix) return 0;
  return mode == "spatial" ? heads : mode == "split" ? heads / 2 : 0;
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

// Per-group rows of the prefix tokens, (B, Ha, G, P, Dh) or (B, Ha, G, P), contiguous.
template <typename T>
struct Partials {
  T* data;
  int64_t heads, groups, prefix, width;
  T* at(int64_t b, int64_t h, int64_t g, int64_t p = 0) const {
    return data + (((b * heads + h) * groups + g) * prefix + p) * width;
  }
};

// The blocks of at most `max_rows` tokens of group g: the prefix tokens' (spatial heads; a prefix
// block's `first` is then also its index among the prefix tokens), then the members'.
template <typename F>
void for_blocks(const IndexMap& grp, int64_t g, int64_t max_rows, F&& f) {
  if (grp.prefix) {
    const int64_t blk = block_size(grp.prefix, max_rows);
    for (int64_t p0 = 0; p0 < grp.prefix; p0 += blk) f(Rows{p0, std::min(blk, grp.prefix - p0), 1}, true);
  }
  const int64_t first = grp.base + g * grp.group_stride, blk = block_size(grp.length, max_rows);
  for (int64_t i0 = 0; i0 < grp.length; i0 += blk)
    f(Rows{first + i0 * grp.member_stride, std::min(blk, grp.length - i0), grp.member_stride}, false);
}

// A block of query rows of group(s) g .. g + groups - 1 of a head's index map: `rows` members
// from member `first_row` of each group, or (prefix_rows) prefix queries `first_row` .. of group g.
// Short (temporal) groups go whole, several to an item, each for `heads` heads from h: group by
// group, every head of a group before the next group.
struct WorkItem {
  int64_t b, h, map_index, g, groups, first_row, rows;
  bool prefix_rows;
  double cost;
  int64_t heads = 1;
};

constexpr int64_t kShortGroupsPerItem = 8;

// Groups that short_group_forward/backward (block_math.cpp) take whole: no prefix tokens, and few
// enough members that their scores and products fit register tiles rather than BLAS calls.
bool is_short(const IndexMap& grp) { return grp.length <= kShortGroup && !grp.prefix; }

int64_t groups_per_item(const IndexMap& grp) { return is_short(grp) ? kShortGroupsPerItem : 1; }

// Groups with prefix tokens (spatial heads) that fit one block: their rows, prefix tokens first,
// are gathered into contiguous scratch, so one product covers every query and key. Split into a
// block of prefix rows and a block of members, such a group costs up to 4x the products' calls and
// passes over the block, each for a row or a column: a third more time at ViViT-B.
bool is_gathered(const IndexMap& grp) { return grp.prefix && grp.prefix + grp.length <= kMaxBlock; }

// The token of row r of group g's gathered block.
int64_t gathered_token(const IndexMap& grp, int64_t g, int64_t r) {
  return r < grp.prefix ? r : grp.base + g * grp.group_stride + (r - grp.prefix) * grp.member_stride;
}

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
    fence_streamed_stores();
  });
}

// The call's geometry, shared by forward and backward: each run of heads with its index maps.
struct Geometry {
  int64_t B, H, N, Dh, P, Ha, G;  // Ha heads [0, Ha) average their prefix queries over G groups
  std::vector<std::pair<HeadRange, std::vector<IndexMap>>> runs;

  Geometry(const at::Tensor& q, int64_t frames, int64_t prefix, c10::string_view layout, c10::string_view mode)
      : B(q.size(0)), H(q.size(1)), N(q.size(2)), Dh(q.size(3)), P(prefix), Ha(averaged_heads(mode, q.size(1), prefix)),
        G(Ha ? frames : 0) {
    for (const auto& range : head_ranges(mode, H))
      runs.emplace_back(range, index_maps(range.mode, layout, frames, (N - prefix) / frames, prefix));
  }
  const IndexMap& index_map(int64_t h, int64_t index) const {
    for (const auto& [range, groups] : runs)
      if (h < range.h1) return groups[index];
    TORCH_CHECK(false, "factorised_attention: head out of range");
  }
  // Items group by group, every head of a run in turn; `per_group` adds the items of a group.
  template <typename F>
  std::vector<WorkItem> items(F&& per_group) const {
    std::vector<WorkItem> out;
    for (int64_t b = 0; b < B; ++b)
      for (const auto& [range, groups] : runs)
        for (size_t index = 0; index < groups.size(); ++index) {
          const IndexMap& grp = groups[index];
          const int64_t run = groups_per_item(grp);
          for (int64_t g = 0; g < grp.groups; g += run) per_group(out, b, range, int64_t(index), grp, g, std::min(run, grp.groups - g));
        }
    return out;
  }
};

template <typename T>
void forward_kernel(const View<T>& q, const View<T>& k, const View<T>& v, const View<T>& out, T* lse,
                    const Partials<T>& prefix_out, const Partials<T>& prefix_lse, const Geometry& geo, T scale) {
  const int64_t H = geo.H, N = geo.N, Dh = geo.Dh;
  const auto items = geo.items([&](std::vector<WorkItem>& out_items, int64_t b, const HeadRange& range, int64_t index,
                                   const IndexMap& grp, int64_t g, int64_t groups) {
    const int64_t keys = grp.prefix + grp.length, blk = block_size(grp.length);
    if (is_short(grp)) {
      const int64_t heads = range.h1 - range.h0;
      out_items.push_back({b, range.h0, index, g, groups, 0, grp.length, false,
                           2.0 * heads * groups * grp.length * (keys + 8) * Dh, heads});
      return;
    }
    if (is_gathered(grp)) {
      for (int64_t h = range.h0; h < range.h1; ++h)
        out_items.push_back({b, h, index, g, groups, 0, keys, false, 2.0 * groups * keys * (keys + 8) * Dh});
      return;
    }
    for (int64_t i0 = 0; i0 < grp.length; i0 += blk)
      for (int64_t h = range.h0; h < range.h1; ++h) {
        const int64_t rows = std::min(blk, grp.length - i0);
        out_items.push_back({b, h, index, g, groups, i0, rows, false, 2.0 * groups * rows * (keys + 8) * Dh});
      }
    if (grp.prefix) {
      const int64_t pblk = block_size(grp.prefix);
      for (int64_t p0 = 0; p0 < grp.prefix; p0 += pblk)
        for (int64_t h = range.h0; h < range.h1; ++h) {
          const int64_t rows = std::min(pblk, grp.prefix - p0);
          out_items.push_back({b, h, index, g, 1, p0, rows, true, 2.0 * rows * (keys + 8) * Dh});
        }
    }
  });
  run_items(items, [&](const WorkItem& work) {
    thread_local std::vector<T> scores, acc, row_max, row_sum;
    scores.resize(kMaxBlock * kMaxKeyBlock), acc.resize(kMaxBlock * Dh), row_max.resize(kMaxBlock), row_sum.resize(kMaxBlock);
    const int64_t b = work.b, M = work.rows;
    const IndexMap& grp = geo.index_map(work.h, work.map_index);
    if (is_short(grp)) {
      const int64_t step = grp.member_stride;
      for (int64_t g = work.g; g < work.g + work.groups; ++g)
        for (int64_t h = work.h; h < work.h + work.heads; ++h) {
          const int64_t n = grp.base + g * grp.group_stride;
          ShortGroup<T> group{grp.length, Dh, q.row(b, h, n), k.row(b, h, n), v.row(b, h, n), step * q.sn,
                              step * k.sn, step * v.sn, out.row(b, h, n), step * out.sn, lse + (b * H + h) * N + n,
                              step};
          if (g + 1 < grp.groups)  // this head's rows of the next group: used a group of heads later
            for (const View<T>* x : {&q, &k, &v, &out})
              group.next[group.ahead] = x->row(b, h, n + grp.group_stride), group.next_stride[group.ahead++] = step * x->sn;
          short_group_forward(group, scale);
        }
      return;
    }
    const int64_t h = work.h;
    if (is_gathered(grp)) {
      thread_local std::vector<T> qs, ks, vs;
      for (auto* x : {&qs, &ks, &vs}) x->resize(kMaxBlock * Dh);
      const int64_t L = grp.prefix + grp.length;
      for (int64_t g = work.g; g < work.g + work.groups; ++g) {
        for (int64_t r = 0; r < L; ++r) {
          const int64_t n = gathered_token(grp, g, r);
          std::copy_n(q.row(b, h, n), Dh, qs.data() + r * Dh);
          std::copy_n(k.row(b, h, n), Dh, ks.data() + r * Dh);
          std::copy_n(v.row(b, h, n), Dh, vs.data() + r * Dh);
        }
        gemm<T>(false, true, L, L, Dh, T(1), qs.data(), Dh, ks.data(), Dh, T(0), scores.data(), L);
        for (int64_t i = 0; i < L; ++i) {
          T* s = scores.data() + i * L;
          row_max[i] = scaled_max(s, L, scale);
          row_sum[i] = exp_sum(s, L, scale, row_max[i]);
        }
        T* const os = qs.data();  // the queries are spent: the outputs take their place
        gemm<T>(false, false, L, Dh, L, T(1), scores.data(), L, vs.data(), Dh, T(0), os, Dh);
        divide_rows(os, L, Dh, Dh, row_sum.data());
        for (int64_t r = 0; r < L; ++r) {
          const int64_t n = gathered_token(grp, g, r);
          const bool prefix_row = r < grp.prefix;
          std::copy_n(os + r * Dh, Dh, prefix_row ? prefix_out.at(b, h, g, r) : out.row(b, h, n));
          (prefix_row ? *prefix_lse.at(b, h, g, r) : lse[(b * H + h) * N + n]) = row_max[r] + std::log(row_sum[r]);
        }
      }
      return;
    }
    // All keys in one block (spatial groups without prefix tokens): the softmax is exact after
    // one block, so the product with V goes straight into out, normalised there, with no
    // accumulator to clear, rescale and copy.
    const bool one_block = !grp.prefix && grp.length <= kMaxKeyBlock;
    for (int64_t g = work.g; g < work.g + work.groups; ++g) {
      const Rows rows = work.prefix_rows ? Rows{work.first_row, M, 1}
                                         : Rows{grp.base + g * grp.group_stride + work.first_row * grp.member_stride, M,
                                                grp.member_stride};
      const T* Q = q.row(b, h, rows.first);
      T* const O = one_block ? out.row(b, h, rows.first) : acc.data();
      const int64_t ldo = one_block ? rows.step * out.sn : Dh;
      std::fill(row_max.begin(), row_max.begin() + M, -std::numeric_limits<T>::infinity());
      std::fill(row_sum.begin(), row_sum.begin() + M, T(0));
      if (!one_block) std::fill(acc.begin(), acc.begin() + M * Dh, T(0));
      for_blocks(grp, g, kMaxKeyBlock, [&](const Rows& keys, bool) {
        const int64_t Nb = keys.count;
        gemm<T>(false, true, M, Nb, Dh, T(1), Q, rows.step * q.sn, k.row(b, h, keys.first), keys.step * k.sn, T(0),
                scores.data(), Nb);
        // Online softmax: rescale what was accumulated under the old running max.
        for (int64_t i = 0; i < M; ++i) {
          T* s = scores.data() + i * Nb;
          const T m = std::max(row_max[i], scaled_max(s, Nb, scale));  // a NaN logit may be skipped here ...
          const T sum = exp_sum(s, Nb, scale, m);                          // ... but poisons the row here
          const T correction = std::exp(row_max[i] - m);
          row_sum[i] = row_sum[i] * correction + sum;
          row_max[i] = m;
          if (!one_block && correction != T(1))
            for (int64_t d = 0; d < Dh; ++d) acc[i * Dh + d] *= correction;
        }
        // mutant: cpp-v-strides
        gemm<T>(false, false, M, Dh, Nb, T(1), scores.data(), Nb, v.row(b, h, keys.first), keys.step * v.sn,
                one_block ? T(0) : T(1), O, ldo);
      });
      if (one_block) divide_rows(O, M, Dh, ldo, row_sum.data());
      for (int64_t i = 0; i < M; ++i) {
        const int64_t n = rows.first + i * rows.step;
        if (!one_block) {
          T* o = work.prefix_rows ? prefix_out.at(b, h, g, n) : out.row(b, h, n);
          const T inv = T(1) / row_sum[i];
          for (int64_t d = 0; d < Dh; ++d) o[d] = acc[i * Dh + d] * inv;
        }
        // mutant: cpp-lse
        (work.prefix_rows ? *prefix_lse.at(b, h, g, n) : lse[(b * H + h) * N + n]) = row_max[i] + std::log(row_sum[i]);
      }
    }
  });
  // The averaged prefix queries: their rows of out hold the mean over the groups (their lse rows
  // are unused, written 0).
  for (int64_t b = 0; b < geo.B; ++b)
    for (int64_t h = 0; h < geo.Ha; ++h)
      for (int64_t p = 0; p < geo.P; ++p) {
        T* o = out.row(b, h, p);
        std::fill(o, o + Dh, T(0));
        for (int64_t g = 0; g < geo.G; ++g)
          for (int64_t d = 0; d < Dh; ++d) o[d] += prefix_out.at(b, h, g, p)[d];
        for (int64_t d = 0; d < Dh; ++d) o[d] /= T(geo.G);  // mutant: cpp-prefix-mean
        lse[(b * H + h) * N + p] = T(0);
      }
}

template <typename T>
void backward_kernel(const View<T>& dout, const View<T>& q, const View<T>& k, const View<T>& v, const View<T>& out,
                     const T* lse, const Partials<T>& prefix_out, const Partials<T>& prefix_lse, const View<T>& dq,
                     const View<T>& dk, const View<T>& dv, const Partials<T>& pdq, const Partials<T>& pdk,
                     const Partials<T>& pdv, const Geometry& geo, T scale) {
  const int64_t H = geo.H, N = geo.N, Dh = geo.Dh;
  // One item per group: it alone writes the group's rows of dq, dk, dv (the prefix rows of a
  // spatial group go to that group's partials), so no reduction is needed inside the loop.
  const auto items = geo.items([&](std::vector<WorkItem>& out_items, int64_t b, const HeadRange& range, int64_t index,
                                   const IndexMap& grp, int64_t g, int64_t groups) {
    const int64_t L = grp.prefix + grp.length;
    if (is_short(grp)) {
      const int64_t heads = range.h1 - range.h0;
      out_items.push_back({b, range.h0, index, g, groups, 0, grp.length, false, 5.0 * heads * groups * L * (L + 8) * Dh,
                           heads});
      return;
    }
    for (int64_t h = range.h0; h < range.h1; ++h)
      out_items.push_back({b, h, index, g, groups, 0, grp.length, false, 5.0 * groups * L * (L + 8) * Dh});
  });
  run_items(items, [&](const WorkItem& work) {
    thread_local std::vector<T> probs, dprobs, delta, row_lse, scaled;
    probs.resize(kMaxBlock * kMaxBlock), dprobs.resize(kMaxBlock * kMaxBlock), delta.resize(kMaxBlock),
        row_lse.resize(kMaxBlock), scaled.resize(kMaxBlock * Dh);
    const int64_t b = work.b;
    const IndexMap& grp = geo.index_map(work.h, work.map_index);
    if (is_short(grp)) {
      const int64_t step = grp.member_stride;
      for (int64_t g = work.g; g < work.g + work.groups; ++g)
        for (int64_t h = work.h; h < work.h + work.heads; ++h) {
          const int64_t n = grp.base + g * grp.group_stride;
          ShortGroup<T> group{grp.length, Dh, q.row(b, h, n), k.row(b, h, n), v.row(b, h, n), step * q.sn,
                              step * k.sn, step * v.sn, out.row(b, h, n), step * out.sn, nullptr, step,
                              lse + (b * H + h) * N + n, dout.row(b, h, n), step * dout.sn, dq.row(b, h, n),
                              dk.row(b, h, n), dv.row(b, h, n), step * dq.sn, step * dk.sn, step * dv.sn};
          if (g + 1 < grp.groups)  // this head's rows of the next group: used a group of heads later
            for (const View<T>* x : {&q, &k, &v, &dout, &dq, &dk, &dv})
              group.next[group.ahead] = x->row(b, h, n + grp.group_stride), group.next_stride[group.ahead++] = step * x->sn;
          short_group_backward(group, scale);
        }
      return;
    }
    const int64_t h = work.h;
    if (is_gathered(grp)) {
      thread_local std::vector<T> qs, ks, vs, dos, grads;
      for (auto* x : {&qs, &ks, &vs, &dos}) x->resize(kMaxBlock * Dh);
      grads.resize(3 * kMaxBlock * Dh);
      const int64_t L = grp.prefix + grp.length;
      T *const dqs = grads.data(), *const dks = dqs + L * Dh, *const dvs = dks + L * Dh;
      for (int64_t g = work.g; g < work.g + work.groups; ++g) {
        for (int64_t r = 0; r < L; ++r) {
          const int64_t n = gathered_token(grp, g, r);
          const bool prefix_row = r < grp.prefix;
          std::copy_n(q.row(b, h, n), Dh, qs.data() + r * Dh);
          std::copy_n(k.row(b, h, n), Dh, ks.data() + r * Dh);
          std::copy_n(v.row(b, h, n), Dh, vs.data() + r * Dh);
          // A prefix query's output is the mean of its G groups' outputs: this group's share of
          // its gradient is grad / G.
          const T* dout_row = dout.row(b, h, n);
          T* dO = dos.data() + r * Dh;
          // mutant: cpp-gathered-share
          for (int64_t d = 0; d < Dh; ++d) dO[d] = prefix_row ? dout_row[d] / T(geo.G) : dout_row[d];
          const T* o = prefix_row ? prefix_out.at(b, h, g, r) : out.row(b, h, n);
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t d = 0; d < Dh; ++d) sum += o[d] * dO[d];
          delta[r] = sum;
          row_lse[r] = prefix_row ? *prefix_lse.at(b, h, g, r) : lse[(b * H + h) * N + n];
        }
        // Scores transposed, as in the blocks below.
        gemm<T>(false, true, L, L, Dh, T(1), ks.data(), Dh, qs.data(), Dh, T(0), probs.data(), L);
        gemm<T>(false, true, L, L, Dh, T(1), vs.data(), Dh, dos.data(), Dh, T(0), dprobs.data(), L);
        softmax_grad_cols(probs.data(), dprobs.data(), L, L, scale, row_lse.data(), delta.data());
        gemm<T>(false, false, L, Dh, L, T(1), probs.data(), L, dos.data(), Dh, T(0), dvs, Dh);
        gemm<T>(false, false, L, Dh, L, T(1), dprobs.data(), L, qs.data(), Dh, T(0), dks, Dh);
        gemm<T>(true, false, L, Dh, L, T(1), dprobs.data(), L, ks.data(), Dh, T(0), dqs, Dh);
        // This item alone writes the members' rows; the prefix rows go to the group's partials.
        for (int64_t r = 0; r < L; ++r) {
          const int64_t n = gathered_token(grp, g, r);
          const bool prefix_row = r < grp.prefix;
          std::copy_n(dqs + r * Dh, Dh, prefix_row ? pdq.at(b, h, g, r) : dq.row(b, h, n));
          std::copy_n(dks + r * Dh, Dh, prefix_row ? pdk.at(b, h, g, r) : dk.row(b, h, n));
          std::copy_n(dvs + r * Dh, Dh, prefix_row ? pdv.at(b, h, g, r) : dv.row(b, h, n));
        }
      }
      return;
    }
    for (int64_t g = work.g; g < work.g + work.groups; ++g) {
      bool first_query_block = true;
      for_blocks(grp, g, kMaxBlock, [&](const Rows& qr, bool prefix_queries) {
        const int64_t M = qr.count;
        const T* Q = q.row(b, h, qr.first);
        // A prefix query's output is the mean of its G groups' outputs: each group's share of
        // its gradient is grad / G.
        const T* dO = dout.row(b, h, qr.first);
        int64_t ldo = qr.step * dout.sn;
        if (prefix_queries) {
          for (int64_t i = 0; i < M; ++i)
            for (int64_t d = 0; d < Dh; ++d) scaled[i * Dh + d] = dout.row(b, h, qr.first + i)[d] / T(geo.G);
          dO = scaled.data(), ldo = Dh;
        }
        for (int64_t i = 0; i < M; ++i) {
          const int64_t n = qr.first + i * qr.step;
          const T* o = prefix_queries ? prefix_out.at(b, h, g, n) : out.row(b, h, n);  // mutant: cpp-prefix-delta
          const T* dout_row = dO + i * ldo;
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t d = 0; d < Dh; ++d) sum += o[d] * dout_row[d];
          delta[i] = sum;
          row_lse[i] = prefix_queries ? *prefix_lse.at(b, h, g, n) : lse[(b * H + h) * N + n];
        }
        T* dQ = prefix_queries ? pdq.at(b, h, g, qr.first) : dq.row(b, h, qr.first);
        const int64_t ldq = prefix_queries ? Dh : qr.step * dq.sn;
        bool first_key_block = true;
        for_blocks(grp, g, kMaxBlock, [&](const Rows& kr, bool prefix_keys) {
          const int64_t Nb = kr.count;
          const T* K = k.row(b, h, kr.first);
          // The scores transposed (a row per key, Nb x M), so that the products into dV and dK,
          // and all but the one into dQ, take their left operand as it lies (gemm's fast path).
          gemm<T>(false, true, Nb, M, Dh, T(1), K, kr.step * k.sn, Q, qr.step * q.sn, T(0), probs.data(), M);
          gemm<T>(false, true, Nb, M, Dh, T(1), v.row(b, h, kr.first), kr.step * v.sn, dO, ldo, T(0), dprobs.data(), M);
          // P from the saved log-sum-exp, and dS (the gradient of the unscaled logits) in place of dP.
          softmax_grad_cols(probs.data(), dprobs.data(), Nb, M, scale, row_lse.data(), delta.data());
          T* dK = prefix_keys ? pdk.at(b, h, g, kr.first) : dk.row(b, h, kr.first);
          T* dV = prefix_keys ? pdv.at(b, h, g, kr.first) : dv.row(b, h, kr.first);
          const int64_t ldk = prefix_keys ? Dh : kr.step * dk.sn, ldv = prefix_keys ? Dh : kr.step * dv.sn;
          // The first block to reach a row of dk, dv (the first query block) or dq (the first key
          // block) overwrites it: no zero fill.
          const T kv_beta = first_query_block ? T(0) : T(1), q_beta = first_key_block ? T(0) : T(1);
          gemm<T>(false, false, Nb, Dh, M, T(1), probs.data(), M, dO, ldo, kv_beta, dV, ldv);
          gemm<T>(false, false, Nb, Dh, M, T(1), dprobs.data(), M, Q, qr.step * q.sn, kv_beta, dK, ldk);
          gemm<T>(true, false, M, Dh, Nb, T(1), dprobs.data(), M, K, kr.step * k.sn, q_beta, dQ, ldq);
          first_key_block = false;
        });
        first_query_block = false;
      });
    }
  });
  // The prefix rows of the spatial heads: the sum of their groups' partials.
  for (int64_t b = 0; b < geo.B; ++b)
    for (int64_t h = 0; h < geo.Ha; ++h)
      for (int64_t p = 0; p < geo.P; ++p)
        for (auto [dst, part] : {std::pair{&dq, &pdq}, std::pair{&dk, &pdk}, std::pair{&dv, &pdv}}) {
          T* row = dst->row(b, h, p);
          std::fill(row, row + Dh, T(0));
          for (int64_t g = 0; g < geo.G; ++g)
            for (int64_t d = 0; d < Dh; ++d) row[d] += part->at(b, h, g, p)[d];
        }
}

// Rows of Dh must be contiguous for BLAS; anything else (rare) is copied once.
at::Tensor rows_contiguous(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t frames, int64_t prefix) {
  for (const auto* x : {&q, &k, &v}) {
    TORCH_CHECK(x->dim() == 4 && x->sizes() == q.sizes(), "factorised_attention: q, k, v must be (B, H, N, Dh)");
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == q.scalar_type(),
                "factorised_attention: q, k, v must be CPU tensors of one dtype");
  }
  TORCH_CHECK(frames >= 1 && prefix >= 0 && q.size(2) > prefix && (q.size(2) - prefix) % frames == 0,
              "factorised_attention: N - prefix must be divisible by frames");
}

template <typename T>
Partials<T> partials(const at::Tensor& x, const Geometry& geo, int64_t width) {
  return {x.data_ptr<T>(), geo.Ha, geo.G, geo.P, width};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, int64_t frames, int64_t prefix,
    c10::string_view layout, c10::string_view mode, double scale) {
  check_inputs(q_, k_, v_, frames, prefix);
  const at::Tensor q = rows_contiguous(q_), k = rows_contiguous(k_), v = rows_contiguous(v_);
  const Geometry geo(q, frames, prefix, layout, mode);
  // (B, N, H, Dh): the layout the output projection reads; returned as a (B, H, N, Dh) view.
  at::Tensor out = at::empty({geo.B, geo.N, geo.H, geo.Dh}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({geo.B, geo.H, geo.N}, q.options());
  // Empty (0,) when no prefix query is averaged (the ops' contract).
  at::Tensor prefix_out = geo.Ha ? at::empty({geo.B, geo.Ha, geo.G, geo.P, geo.Dh}, q.options()) : at::empty({0}, q.options());
  at::Tensor prefix_lse = geo.Ha ? at::empty({geo.B, geo.Ha, geo.G, geo.P}, q.options()) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "vivit_kernels::cpu_attention_forward", [&] {
    forward_kernel<scalar_t>(View<scalar_t>(q), View<scalar_t>(k), View<scalar_t>(v), View<scalar_t>(out),
                             lse.data_ptr<scalar_t>(), partials<scalar_t>(prefix_out, geo, geo.Dh),
                             partials<scalar_t>(prefix_lse, geo, 1), geo, scalar_t(scale));
  });
  return {out, lse, prefix_out, prefix_lse};
}

namespace {

// Writes dq, dk, dv ((B, H, N, Dh) views whose rows of Dh are contiguous) in full.
void backward_into(const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                   const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& prefix_out_,
                   const at::Tensor& prefix_lse_, int64_t frames, int64_t prefix, c10::string_view layout,
                   c10::string_view mode, double scale, const at::Tensor& dq, const at::Tensor& dk,
                   const at::Tensor& dv) {
  check_inputs(q_, k_, v_, frames, prefix);
  check_inputs(grad_out_, out_, q_, frames, prefix);
  const at::Tensor q = rows_contiguous(q_), k = rows_contiguous(k_), v = rows_contiguous(v_);
  const at::Tensor grad_out = rows_contiguous(grad_out_), out = rows_contiguous(out_), lse = lse_.contiguous();
  const at::Tensor prefix_out = prefix_out_.contiguous(), prefix_lse = prefix_lse_.contiguous();
  const Geometry geo(q, frames, prefix, layout, mode);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({geo.B, geo.H, geo.N}) && lse.scalar_type() == q.scalar_type(),
              "factorised_attention: lse must be (B, H, N) in q's dtype");
  TORCH_CHECK(prefix_out.numel() == geo.B * geo.Ha * geo.G * geo.P * geo.Dh &&
                  prefix_lse.numel() == geo.B * geo.Ha * geo.G * geo.P,
              "factorised_attention: prefix_out / prefix_lse do not match the call");
  // Each spatial group's share of the prefix rows' gradients, summed afterwards.
  at::Tensor pdq = at::empty_like(prefix_out), pdk = at::empty_like(prefix_out), pdv = at::empty_like(prefix_out);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "vivit_kernels::cpu_attention_backward", [&] {
    const auto part = [&](const at::Tensor& x) { return partials<scalar_t>(x, geo, geo.Dh); };
    backward_kernel<scalar_t>(View<scalar_t>(grad_out), View<scalar_t>(q), View<scalar_t>(k), View<scalar_t>(v),
                              View<scalar_t>(out), lse.data_ptr<scalar_t>(), part(prefix_out),
                              partials<scalar_t>(prefix_lse, geo, 1), View<scalar_t>(dq), View<scalar_t>(dk),
                              View<scalar_t>(dv), part(pdq), part(pdk), part(pdv), geo, scalar_t(scale));
  });
}

// q, k, v as (B, H, N, Dh) views of a (B, N, 3 * H * Dh) packed projection.
std::array<at::Tensor, 3> unpack(const at::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % (3 * heads) == 0,
              "factorised_attention: qkv must be (B, N, 3 * H * Dh)");
  const auto views = qkv.unflatten(2, {3, heads, qkv.size(2) / (3 * heads)}).permute({2, 0, 3, 1, 4}).unbind(0);
  return {views[0], views[1], views[2]};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& prefix_out, const at::Tensor& prefix_lse, int64_t frames, int64_t prefix,
    c10::string_view layout, c10::string_view mode, double scale) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dh = q.size(3);
  // The layout of out: (B, H, N, Dh) views of (B, N, H, Dh) buffers.
  at::Tensor dq = at::empty({B, N, H, Dh}, q.options()).transpose(1, 2);
  at::Tensor dk = at::empty({B, N, H, Dh}, q.options()).transpose(1, 2);
  at::Tensor dv = at::empty({B, N, H, Dh}, q.options()).transpose(1, 2);
  backward_into(grad_out, q, k, v, out, lse, prefix_out, prefix_lse, frames, prefix, layout, mode, scale, dq, dk, dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_packed_forward(
    const at::Tensor& qkv, int64_t heads, int64_t frames, int64_t prefix, c10::string_view layout,
    c10::string_view mode, double scale) {
  const auto [q, k, v] = unpack(qkv, heads);
  auto [out, lse, prefix_out, prefix_lse] = attention_forward(q, k, v, frames, prefix, layout, mode, scale);
  // (B, H, N, Dh) view of a (B, N, H, Dh) buffer -> (B, N, H * Dh): a view, no copy.
  return {out.transpose(1, 2).flatten(2), lse, prefix_out, prefix_lse};
}

at::Tensor attention_packed_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                     const at::Tensor& lse, const at::Tensor& prefix_out, const at::Tensor& prefix_lse,
                                     int64_t heads, int64_t frames, int64_t prefix, c10::string_view layout,
                                     c10::string_view mode, double scale) {
  const auto [q, k, v] = unpack(qkv, heads);
  const int64_t B = q.size(0), N = q.size(2), Dh = q.size(3);
  // The gradient of the packed projection, written in place by the kernels: no stack, no copy.
  at::Tensor dqkv = at::empty({B, N, 3 * heads * Dh}, q.options());
  const auto [dq, dk, dv] = unpack(dqkv, heads);
  const auto as_heads = [&](const at::Tensor& x) { return x.unflatten(2, {heads, Dh}).transpose(1, 2); };
  backward_into(as_heads(grad_out), q, k, v, as_heads(out), lse, prefix_out, prefix_lse, frames, prefix, layout, mode,
                scale, dq, dk, dv);
  return dqkv;
}

}  // namespace vivit_kernels
