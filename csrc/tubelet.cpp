// Tubelet embedding on CPU: a GEMM whose left operand, the (tokens x C*t*h*w) matrix of tubes, is
// gathered from the video one block of rows at a time into a per-thread buffer, so the unfolded
// video never exists as a whole. Since kernel == stride, tubes do not overlap: the video gradient
// is a scatter of (grad @ weight) rows, and positions that no whole tube covers get zero.

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/flatten.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <vector>

namespace vivit_kernels {
namespace {

constexpr int64_t kRowBlock = 64;  // tubes gathered per block

// Small calls run on the calling thread: waking a busy machine's threads costs more than they save.
int64_t grain(int64_t items, int64_t multiply_adds) { return multiply_adds < (1 << 20) ? std::max<int64_t>(items, 1) : 1; }

// Where the tubes lie in a (B, C, T, H, W) tensor with the given strides: each tube is C*t*h runs
// of w elements; a tube's row r = ((b * nt + it) * nh + ih) * nw + iw.
struct Tubes {
  int64_t nt, nh, nw, t, h, w, C, K;
  std::vector<int64_t> stride;     // of the video, in elements
  std::vector<int64_t> run_start;  // offset of each of the C*t*h runs from the tube's corner

  Tubes(at::IntArrayRef size, at::IntArrayRef strides, at::IntArrayRef tubelet)
      : nt(size[2] / tubelet[0]), nh(size[3] / tubelet[1]), nw(size[4] / tubelet[2]), t(tubelet[0]), h(tubelet[1]),
        w(tubelet[2]), C(size[1]), K(size[1] * tubelet[0] * tubelet[1] * tubelet[2]), stride(strides.vec()) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t dt = 0; dt < t; ++dt)
        for (int64_t dh = 0; dh < h; ++dh) run_start.push_back(c * stride[1] + dt * stride[2] + dh * stride[3]);
  }
  int64_t rows(int64_t batch) const { return batch * nt * nh * nw; }
  int64_t corner(int64_t r) const {
    const int64_t iw = r % nw, ih = r / nw % nh, it = r / (nw * nh) % nt, b = r / (nw * nh * nt);
    return b * stride[0] + it * t * stride[2] + ih * h * stride[3] + iw * w * stride[4];  // mutant: cpp-tube-corner
  }
  // dst[kk] = video[tube r, column k0 + kk] for kk < cols (k = run * w + dw).
  template <typename T>
  void gather(const T* video, int64_t r, int64_t k0, int64_t cols, T* dst) const {
    const T* base = video + corner(r);
    const int64_t sw = stride[4];
    for (int64_t k = k0; k < k0 + cols;) {
      const int64_t run = k / w, dw = k % w, len = std::min(w - dw, k0 + cols - k);
      const T* src = base + run_start[run] + dw * sw;
      if (sw == 1)
        std::copy(src, src + len, dst);
      else
        for (int64_t i = 0; i < len; ++i) dst[i] = src[i * sw];
      dst += len;
      k += len;
    }
  }
  // video[tube r] = src (a whole row of K); video has the strides this was built with.
  template <typename T>
  void scatter(const T* src, int64_t r, T* video) const {
    T* base = video + corner(r);
    for (size_t run = 0; run < run_start.size(); ++run)
      for (int64_t dw = 0; dw < w; ++dw) base[run_start[run] + dw * stride[4]] = src[run * w + dw];
  }
};

}  // namespace

at::Tensor tubelet_forward(const at::Tensor& video, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
                           const std::optional<at::Tensor>& pos_embed_) {
  TORCH_CHECK(video.dim() == 5 && weight_.dim() == 5 && video.size(1) == weight_.size(1),
              "tubelet_embedding: expected video (B, C, T, H, W) and weight (D, C, t, h, w)");
  const at::Tensor weight = weight_.contiguous();  // (D, K) rows
  const int64_t B = video.size(0), D = weight.size(0);
  const Tubes tubes(video.sizes(), video.strides(), weight.sizes().slice(2));
  const int64_t rows = tubes.rows(B), K = tubes.K, per_clip = tubes.nt * tubes.nh * tubes.nw;
  at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  at::Tensor pos = pos_embed_.has_value() ? pos_embed_->contiguous() : at::Tensor();
  TORCH_CHECK(!bias.defined() || bias.numel() == D, "tubelet_embedding: bias must be (D,)");
  TORCH_CHECK(!pos.defined() || pos.numel() == per_clip * D, "tubelet_embedding: pos_embed must be (nt * S', D)");
  at::Tensor out = at::empty({B, tubes.nt, tubes.nh * tubes.nw, D}, video.options());
  AT_DISPATCH_FLOATING_TYPES(video.scalar_type(), "vivit_kernels::cpu_tubelet_forward", [&] {
    const scalar_t* src = video.data_ptr<scalar_t>();
    const scalar_t* W = weight.data_ptr<scalar_t>();
    const scalar_t* bias_p = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pos_p = pos.defined() ? pos.data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, blocks, grain(blocks, rows * K * D), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> A(kRowBlock * K);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * kRowBlock, R = std::min(kRowBlock, rows - r0);
        for (int64_t r = 0; r < R; ++r) tubes.gather(src, r0 + r, 0, K, A.data() + r * K);
        scalar_t* o = dst + r0 * D;
        gemm<scalar_t>(false, true, R, D, K, scalar_t(1), A.data(), K, W, K, scalar_t(0), o, D);
        for (int64_t r = 0; r < R; ++r) {
          scalar_t* orow = o + r * D;
          if (bias_p)
            for (int64_t d = 0; d < D; ++d) orow[d] += bias_p[d];
          if (pos_p) {
            const scalar_t* p = pos_p + (r0 + r) % per_clip * D;
            for (int64_t d = 0; d < D; ++d) orow[d] += p[d];
          }
        }
      }
    });
  });
  return out;
}

at::Tensor tubelet_backward_video(const at::Tensor& grad_, const at::Tensor& video, const at::Tensor& weight_) {
  TORCH_CHECK(video.dim() == 5 && weight_.dim() == 5, "tubelet_embedding: expected video (B, C, T, H, W)");
  const at::Tensor grad = grad_.contiguous(), weight = weight_.contiguous();
  const int64_t D = weight.size(0);
  at::Tensor dvideo = at::zeros_like(video, grad.options());  // zero where no whole tube reaches
  const Tubes tubes(dvideo.sizes(), dvideo.strides(), weight.sizes().slice(2));
  const int64_t rows = tubes.rows(video.size(0)), K = tubes.K;
  TORCH_CHECK(grad.numel() == rows * D, "tubelet_embedding: grad must be (B, nt, S', D)");
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "vivit_kernels::cpu_tubelet_backward_video", [&] {
    const scalar_t* G = grad.data_ptr<scalar_t>();
    const scalar_t* W = weight.data_ptr<scalar_t>();
    scalar_t* dst = dvideo.data_ptr<scalar_t>();
    const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, blocks, grain(blocks, rows * K * D), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> A(kRowBlock * K);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * kRowBlock, R = std::min(kRowBlock, rows - r0);
        gemm<scalar_t>(false, false, R, K, D, scalar_t(1), G + r0 * D, D, W, K, scalar_t(0), A.data(), K);
        for (int64_t r = 0; r < R; ++r) tubes.scatter(A.data() + r * K, r0 + r, dst);
      }
    });
  });
  return dvideo;
}

std::vector<at::Tensor> tubelet_backward_weight(const at::Tensor& grad_, const at::Tensor& video,
                                                const at::Tensor& weight, bool bias_grad) {
  TORCH_CHECK(video.dim() == 5 && weight.dim() == 5, "tubelet_embedding: expected video (B, C, T, H, W)");
  const at::IntArrayRef tubelet = weight.sizes().slice(2);
  const at::Tensor grad = grad_.contiguous();
  const Tubes tubes(video.sizes(), video.strides(), tubelet);
  const int64_t rows = tubes.rows(video.size(0)), K = tubes.K, D = grad.size(-1);
  TORCH_CHECK(grad.numel() == rows * D, "tubelet_embedding: grad must be (B, nt, S', D)");
  at::Tensor dweight = at::empty({D, video.size(1), tubelet[0], tubelet[1], tubelet[2]}, grad.options());
  // Threads own column chunks of dW = grad^T @ tubes, so nothing is reduced across threads.
  const int64_t chunk = std::max<int64_t>(16, (K + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads()));
  const int64_t chunks = (K + chunk - 1) / chunk, row_block = 4 * kRowBlock;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "vivit_kernels::cpu_tubelet_backward_weight", [&] {
    const scalar_t* G = grad.data_ptr<scalar_t>();
    const scalar_t* src = video.data_ptr<scalar_t>();
    scalar_t* dW = dweight.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, grain(chunks, rows * K * D), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> A(row_block * chunk);
      for (int64_t c = begin; c < end; ++c) {
        const int64_t k0 = c * chunk, cols = std::min(chunk, K - k0);
        for (int64_t r0 = 0; r0 < rows; r0 += row_block) {
          const int64_t R = std::min(row_block, rows - r0);
          for (int64_t r = 0; r < R; ++r) tubes.gather(src, r0 + r, k0, cols, A.data() + r * cols);
          gemm<scalar_t>(true, false, D, cols, R, scalar_t(1), G + r0 * D, D, A.data(), cols,
                         scalar_t(r0 == 0 ? 0 : 1), dW + k0, K);  // mutant: cpp-tube-accumulate
        }
      }
    });
  });
  if (!bias_grad) return {dweight};
  return {dweight, grad.sum(at::IntArrayRef{0, 1, 2})};
}

at::Tensor tubelet_backward_pos(const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() == 4, "tubelet_embedding: grad must be (B, nt, S', D)");
  return grad.sum(0).flatten(0, 1);
}

}  // namespace vivit_kernels
