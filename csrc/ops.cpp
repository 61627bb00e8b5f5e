// Declares the CPU kernels to PyTorch's dispatcher, under the project's `vivit_kernels` namespace
// (a fragment: the Triton backend defines its own ops there too). The Python side
// (vivit_kernels/backends/cpu.py) adds the fake (meta) kernels, autograd and FLOP formulas.

#include "kernels.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vivit_kernels, m) {
  m.def("cpu_attention_forward(Tensor q, Tensor k, Tensor v, int frames, str mode, float scale) -> (Tensor, Tensor)");
  m.def(
      "cpu_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int frames, "
      "str mode, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_tubelet_forward(Tensor video, Tensor weight, Tensor? bias, Tensor? pos_embed) -> Tensor");
  m.def("cpu_tubelet_video_grad(Tensor grad, Tensor weight, int[] video_size) -> Tensor");
  m.def("cpu_tubelet_weight_grad(Tensor grad, Tensor video, int[] tubelet) -> Tensor");
}

TORCH_LIBRARY_IMPL(vivit_kernels, CPU, m) {
  m.impl("cpu_attention_forward", &vivit_kernels::attention_forward);
  m.impl("cpu_attention_backward", &vivit_kernels::attention_backward);
  m.impl("cpu_tubelet_forward", &vivit_kernels::tubelet_forward);
  m.impl("cpu_tubelet_video_grad", &vivit_kernels::tubelet_video_grad);
  m.impl("cpu_tubelet_weight_grad", &vivit_kernels::tubelet_weight_grad);
}
