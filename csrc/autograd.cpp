// Autograd of the CPU attention ops, registered for CPU tensors (AutogradCPU). The other backends'
// ops are differentiated in Python (vivit_kernels/ops/attention.py), by the same rule: save the
// inputs, out, lse and the prefix rows; backward calls the backward op on them. Here it runs
// without a Python autograd.Function around each call: that wrapper costs ~55 us per layer's
// forward and backward, more than the whole of a small layer's kernels, where SDPA's autograd
// is C++ too.
//
// Each forward calls the op below autograd through the dispatcher, not the kernel directly, so
// fake tensors (torch.compile, torch.export) and dispatch modes see the op itself.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace vivit_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The grid arguments every attention op takes: frames, prefix, layout, mode, scale.
struct Grid {
  int64_t frames, prefix;
  c10::string_view layout, mode;
  double scale;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["frames"] = frames;
    ctx->saved_data["prefix"] = prefix;
    ctx->saved_data["layout"] = std::string(layout);
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["scale"] = scale;
  }
  // The strings are views of ctx's saved values, valid while ctx is.
  static Grid saved(AutogradContext* ctx) {
    return {ctx->saved_data["frames"].toInt(), ctx->saved_data["prefix"].toInt(),
            ctx->saved_data["layout"].toStringView(), ctx->saved_data["mode"].toStringView(),
            ctx->saved_data["scale"].toDouble()};
  }
};

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// lse and the prefix rows are statistics for backward, not outputs to differentiate.
variable_list outputs(AutogradContext* ctx, const Forward& result) {
  const auto& [out, lse, prefix_out, prefix_lse] = result;
  ctx->mark_non_differentiable({lse, prefix_out, prefix_lse});
  ctx->set_materialize_grads(false);
  return {out, lse, prefix_out, prefix_lse};
}

struct Attention : torch::autograd::Function<Attention> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const Grid& grid) {
    static const auto forward_op =
        op<Forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, c10::string_view,
                   c10::string_view, double)>("vivit_kernels::cpu_attention_forward");
    at::AutoDispatchBelowADInplaceOrView below;
    const Forward result =
        forward_op.call(q, k, v, grid.frames, grid.prefix, grid.layout, grid.mode, grid.scale);
    ctx->save_for_backward({q, k, v, std::get<0>(result), std::get<1>(result), std::get<2>(result),
                            std::get<3>(result)});
    grid.save(ctx);
    return outputs(ctx, result);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op =
        op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, c10::string_view,
            c10::string_view, double)>("vivit_kernels::cpu_attention_backward");
    // No gradient reached out (a later function handed back none): none for the inputs either.
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list s = ctx->get_saved_variables();
    const Grid grid = Grid::saved(ctx);
    auto [dq, dk, dv] = backward_op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], grid.frames,
                                         grid.prefix, grid.layout, grid.mode, grid.scale);
    return {dq, dk, dv, at::Tensor()};  // mutant: cpp-autograd-order
  }
};

struct PackedAttention : torch::autograd::Function<PackedAttention> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv, int64_t heads, const Grid& grid) {
    static const auto forward_op =
        op<Forward(const at::Tensor&, int64_t, int64_t, int64_t, c10::string_view, c10::string_view, double)>(
            "vivit_kernels::cpu_attention_packed_forward");
    at::AutoDispatchBelowADInplaceOrView below;
    const Forward result = forward_op.call(qkv, heads, grid.frames, grid.prefix, grid.layout, grid.mode, grid.scale);
    ctx->save_for_backward(
        {qkv, std::get<0>(result), std::get<1>(result), std::get<2>(result), std::get<3>(result)});
    ctx->saved_data["heads"] = heads;
    grid.save(ctx);
    return outputs(ctx, result);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, int64_t, int64_t, int64_t, c10::string_view, c10::string_view, double)>(
            "vivit_kernels::cpu_attention_packed_backward");
    // No gradient reached out (a later function handed back none): none for the inputs either.
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const variable_list s = ctx->get_saved_variables();
    const Grid grid = Grid::saved(ctx);
    at::Tensor dqkv = backward_op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["heads"].toInt(),
                                       grid.frames, grid.prefix, grid.layout, grid.mode, grid.scale);
    return {dqkv, at::Tensor(), at::Tensor()};
  }
};

Forward as_tuple(const variable_list& r) { return {r[0], r[1], r[2], r[3]}; }

Forward attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t frames,
                           int64_t prefix, c10::string_view layout, c10::string_view mode, double scale) {
  return as_tuple(Attention::apply(q, k, v, Grid{frames, prefix, layout, mode, scale}));
}

Forward attention_packed_autograd(const at::Tensor& qkv, int64_t heads, int64_t frames, int64_t prefix,
                                  c10::string_view layout, c10::string_view mode, double scale) {
  return as_tuple(PackedAttention::apply(qkv, heads, Grid{frames, prefix, layout, mode, scale}));
}

}  // namespace
}  // namespace vivit_kernels

TORCH_LIBRARY_IMPL(vivit_kernels, AutogradCPU, m) {
  m.impl("cpu_attention_forward", &vivit_kernels::attention_autograd);
  m.impl("cpu_attention_packed_forward", &vivit_kernels::attention_packed_autograd);
}
