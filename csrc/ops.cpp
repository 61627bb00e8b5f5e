// Registers the CPU kernels for the ops `vivit_kernels::cpu_*`. Their schemas, fake kernels and
// FLOP formulas are declared once for every backend, in Python (vivit_kernels/ops/): the
// dispatcher checks these functions' signatures against the schemas. The attention ops'
// autograd is registered in autograd.cpp, the tubelet ops' in Python.

#include "kernels.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(vivit_kernels, CPU, m) {
  m.impl("cpu_attention_forward", &vivit_kernels::attention_forward);
  m.impl("cpu_attention_backward", &vivit_kernels::attention_backward);
  m.impl("cpu_attention_packed_forward", &vivit_kernels::attention_packed_forward);
  m.impl("cpu_attention_packed_backward", &vivit_kernels::attention_packed_backward);
  m.impl("cpu_tubelet_forward", &vivit_kernels::tubelet_forward);
  m.impl("cpu_tubelet_backward_video", &vivit_kernels::tubelet_backward_video);
  m.impl("cpu_tubelet_backward_weight", &vivit_kernels::tubelet_backward_weight);
  m.impl("cpu_tubelet_backward_pos", &vivit_kernels::tubelet_backward_pos);
}
