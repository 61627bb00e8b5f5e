// Tubelet embedding on CPU: a GEMM whose left operand, the (tokens x C*t*h*w) matrix of tubes, is
// gathered from the video into one buffer, up to kBlockElements of it at a time, each block of
// rows then taken by one product (`linear`): a product per small block would repack the whole
// weight each time (measured at ViViT-B: 64-row blocks ~15% slower than one product). Since
// kernel == stride, tubes do not overlap: the video gradient is a scatter of (grad @ weight) rows,
// and positions that no whole tube covers get zero.

#include "kernels.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace vivit_kernels {
namespace {

// oneDNN's matmul, through the op torch registers for its compiler's CPU linear layers; absent
// where torch is built without oneDNN.
const std::optional<c10::OperatorHandle>& onednn_linear() {
  static const std::optional<c10::OperatorHandle> op = [] {
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return handle && handle->hasKernelForDispatchKey(c10::DispatchKey::CPU) ? handle : std::nullopt;
  }();
  return op;
}

// x @ w^T (+ bias) for x (M x K) and w (N x K), either possibly a transposed view. Float products
// go to oneDNN's matmul, 4-7% faster than MKL's sgemm at ViViT-B's three tubelet products on the
// AMD CPU measured (where MKL takes its generic path), and double ones, or every one where oneDNN
// is absent or turned off (`torch.backends.mkldnn`), to BLAS. oneDNN copies a non-contiguous x
// first (the weight gradient's grad^T: 1 ms of its 34).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const auto& onednn = onednn_linear();
  if (onednn && x.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn()) {
    // Inference's primitive whatever the operands' requires_grad: no one differentiates this call.
    const at::NoGradGuard no_grad;
    const c10::IValue fused_bias = bias.defined() ? c10::IValue(bias) : c10::IValue();  // mutant: cpp-tube-bias
    torch::jit::Stack stack{x, w, fused_bias, "none", c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    onednn->callBoxed(stack);
    return stack.front().toTensor();
  }
  return bias.defined() ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
}

// Elements of gathered tubes per block (16 MB of fp32): one block for a ViViT-B clip (1568 tubes of
// 1536), a bounded buffer for a large batch.
constexpr int64_t kBlockElements = int64_t(1) << 22;

int64_t block_rows(int64_t rows, int64_t K) { return std::max<int64_t>(1, std::min(rows, kBlockElements / K)); }

// Rows per task of the gather and scatter loops: ~64K elements, so small calls stay on one thread.
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, (int64_t(1) << 16) / K); }

// The calling thread's buffer for gathered tubes (at most kBlockElements), kept between calls: a
// fresh one of a ViViT-B clip's size (9.6 MB fp32) costs ~2,400 page faults at first touch, about
// 1 ms of a 40 ms forward.
template <typename T>
at::Tensor tube_buffer(int64_t rows, int64_t K, const at::TensorOptions& options) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < size_t(rows * K)) buffer.resize(rows * K);
  return at::from_blob(buffer.data(), {rows, K}, options);
}

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
  // Whether the tubes cover every element of a video of this size (no frame, row or column left over).
  bool cover(at::IntArrayRef size) const { return nt * t == size[2] && nh * h == size[3] && nw * w == size[4]; }
  int64_t corner(int64_t r) const {
    const int64_t iw = r % nw, ih = r / nw % nh, it = r / (nw * nh) % nt, b = r / (nw * nh * nt);
    return b * stride[0] + it * t * stride[2] + ih * h * stride[3] + iw * w * stride[4];  // mutant: cpp-tube-corner
  }
  // dst[r - r0] = the tube of row r (K elements, k = run * w + dw), for r in [r0, r0 + R).
  template <typename T>
  void gather(const T* video, int64_t r0, int64_t R, T* dst) const {
    each_run(video, r0, R, dst, [](const T* run, int64_t sw, int64_t w, T* part) { copy_run(run, sw, w, part, 1); });
  }
  // The tube of row r = src[r - r0], for r in [r0, r0 + R); video has the strides this was built with.
  template <typename T>
  void scatter(const T* src, int64_t r0, int64_t R, T* video) const {
    each_run(video, r0, R, src, [](T* run, int64_t sw, int64_t w, const T* part) {
      copy_run(part, 1, w, run, sw);
    });
  }

 private:
  // dst[i * sd] = src[i * ss] for i < w; runs of 16 contiguous elements (ViViT's and most ViTs'
  // patch width) as one fixed-size copy the compiler turns into vector moves.
  template <typename T>
  static void copy_run(const T* src, int64_t ss, int64_t w, T* dst, int64_t sd) {
    if (ss == 1 && sd == 1 && w == 16)
      std::memcpy(dst, src, 16 * sizeof(T));
    else if (ss == 1 && sd == 1)
      std::copy(src, src + w, dst);
    else
      for (int64_t i = 0; i < w; ++i) dst[i * sd] = src[i * ss];
  }
  // f(run of the video, its stride, w, the run's w elements of row r - r0 of rows) for every run
  // of every tube of rows [r0, r0 + R). The tubes of one row of tubes (same b, it, ih) go together,
  // run by run: each of the video's runs is then visited as one stretch of nw * w elements, read in
  // order, rather than w at a time a row of tubes apart.
  template <typename Video, typename Row, typename F>
  void each_run(Video* video, int64_t r0, int64_t R, Row* rows, const F& f) const {
    const int64_t first = r0 / nw, last = (r0 + R + nw - 1) / nw;
    at::parallel_for(first, last, std::max<int64_t>(1, row_grain(K) / nw), [&](int64_t begin, int64_t end) {
      std::vector<Video*> corners(nw);
      for (int64_t tube_row = begin; tube_row < end; ++tube_row) {
        // The tubes of this row within [r0, r0 + R): a block may start or end mid-row.
        // mutant: cpp-tube-row-start
        const int64_t lo = std::max(r0, tube_row * nw), hi = std::min(r0 + R, (tube_row + 1) * nw);
        for (int64_t r = lo; r < hi; ++r) corners[r - lo] = video + corner(r);
        for (size_t run = 0; run < run_start.size(); ++run)
          for (int64_t r = lo; r < hi; ++r)
            f(corners[r - lo] + run_start[run], stride[4], w, rows + (r - r0) * K + run * w);
      }
    });
  }
};

}  // namespace

at::Tensor tubelet_forward(const at::Tensor& video, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
                           const std::optional<at::Tensor>& pos_embed_) {
  TORCH_CHECK(video.dim() == 5 && weight_.dim() == 5 && video.size(1) == weight_.size(1),
              "tubelet_embedding: expected video (B, C, T, H, W) and weight (D, C, t, h, w)");
  const int64_t B = video.size(0), D = weight_.size(0);
  const Tubes tubes(video.sizes(), video.strides(), weight_.sizes().slice(2));
  const int64_t rows = tubes.rows(B), K = tubes.K, per_clip = tubes.nt * tubes.nh * tubes.nw;
  const at::Tensor weight = weight_.contiguous().view({D, K});
  at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  at::Tensor pos = pos_embed_.has_value() ? pos_embed_->contiguous() : at::Tensor();
  TORCH_CHECK(!bias.defined() || bias.numel() == D, "tubelet_embedding: bias must be (D,)");
  TORCH_CHECK(!pos.defined() || pos.numel() == per_clip * D, "tubelet_embedding: pos_embed must be (nt * S', D)");
  const int64_t block = block_rows(rows, K);
  at::Tensor out = block < rows ? at::empty({rows, D}, video.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(video.scalar_type(), "vivit_kernels::cpu_tubelet_forward", [&] {
    const at::Tensor A = tube_buffer<scalar_t>(block, K, video.options());
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int64_t R = std::min(block, rows - r0);
      tubes.gather(video.data_ptr<scalar_t>(), r0, R, A.data_ptr<scalar_t>());
      at::Tensor o = linear(A.narrow(0, 0, R), weight, bias);
      // oneDNN returns a tensor of its own: with one block (a ViViT-B clip) it is the result; with
      // several (a batch past kBlockElements) each is copied into place, one pass over the tokens.
      if (out.defined())
        out.narrow(0, r0, R).copy_(o);
      else
        out = o;
    }
    if (!out.defined()) out = at::empty({rows, D}, video.options());  // no tube at all
    if (pos.defined()) {
      const scalar_t* pos_p = pos.data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* orow = dst + r * D;
          const scalar_t* p = pos_p + r % per_clip * D;
          for (int64_t d = 0; d < D; ++d) orow[d] += p[d];
        }
      });
    }
  });
  return out.view({B, tubes.nt, tubes.nh * tubes.nw, D});
}

at::Tensor tubelet_backward_video(const at::Tensor& grad_, const at::Tensor& video, const at::Tensor& weight_) {
  TORCH_CHECK(video.dim() == 5 && weight_.dim() == 5, "tubelet_embedding: expected video (B, C, T, H, W)");
  at::Tensor dvideo = at::empty_like(video, grad_.options());
  const Tubes tubes(dvideo.sizes(), dvideo.strides(), weight_.sizes().slice(2));
  const int64_t rows = tubes.rows(video.size(0)), K = tubes.K, D = weight_.size(0);
  TORCH_CHECK(grad_.numel() == rows * D, "tubelet_embedding: grad must be (B, nt, S', D)");
  if (!tubes.cover(video.sizes())) dvideo.zero_();  // zero where no whole tube reaches
  const at::Tensor grad = grad_.contiguous().view({rows, D}), weight = weight_.contiguous().view({D, K});
  const int64_t block = block_rows(rows, K);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "vivit_kernels::cpu_tubelet_backward_video", [&] {
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int64_t R = std::min(block, rows - r0);
      const at::Tensor products = linear(grad.narrow(0, r0, R), weight.t(), at::Tensor());  // grad @ weight
      tubes.scatter(products.data_ptr<scalar_t>(), r0, R, dvideo.data_ptr<scalar_t>());
    }
  });
  return dvideo;
}

std::vector<at::Tensor> tubelet_backward_weight(const at::Tensor& grad_, const at::Tensor& video,
                                                const at::Tensor& weight, bool bias_grad) {
  TORCH_CHECK(video.dim() == 5 && weight.dim() == 5, "tubelet_embedding: expected video (B, C, T, H, W)");
  const at::IntArrayRef tubelet = weight.sizes().slice(2);
  const Tubes tubes(video.sizes(), video.strides(), tubelet);
  const int64_t rows = tubes.rows(video.size(0)), K = tubes.K, D = grad_.size(-1);
  TORCH_CHECK(grad_.numel() == rows * D, "tubelet_embedding: grad must be (B, nt, S', D)");
  const at::Tensor grad = grad_.contiguous().view({rows, D});
  at::Tensor dW;  // d(weight) = grad^T @ tubes, summed over the blocks of rows
  const int64_t block = block_rows(rows, K);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "vivit_kernels::cpu_tubelet_backward_weight", [&] {
    const at::Tensor A = tube_buffer<scalar_t>(block, K, grad.options());
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int64_t R = std::min(block, rows - r0);
      tubes.gather(video.data_ptr<scalar_t>(), r0, R, A.data_ptr<scalar_t>());
      at::Tensor part = linear(grad.narrow(0, r0, R).t(), A.narrow(0, 0, R).t(), at::Tensor());
      if (dW.defined())
        dW.add_(part);  // mutant: cpp-tube-accumulate
      else
        dW = part;
    }
  });
  if (!dW.defined()) dW = at::zeros({D, K}, grad.options());  // no tube at all
  const at::Tensor dweight = dW.view({D, video.size(1), tubelet[0], tubelet[1], tubelet[2]});
  if (!bias_grad) return {dweight};
  return {dweight, grad.sum(0)};
}

at::Tensor tubelet_backward_pos(const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() == 4, "tubelet_embedding: grad must be (B, nt, S', D)");
  return grad.sum(0).flatten(0, 1);
}

}  // namespace vivit_kernels
