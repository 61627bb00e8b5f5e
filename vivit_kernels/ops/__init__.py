"""The one autograd layer: every op of every backend, declared once.

A backend supplies launchers (Python functions that run its kernels, or nothing when a compiled
library registers them with the dispatcher); `define_attention_ops` / `define_tubelet_ops` turn
them into `torch.ops.vivit_kernels.{backend}_{op}` custom ops with one schema, fake (meta)
kernel, autograd formula and FLOP formula for all backends, and the autocast rule the backend
declares per device type. What a backend registers is an
`AttentionOps` / `TubeletOps`: callables with the dispatch signature (tensors and the shape
object the checks made).
"""

from .attention import AttentionOps, define_attention_ops
from .tubelet import TubeletOps, define_tubelet_ops

__all__ = ["AttentionOps", "TubeletOps", "define_attention_ops", "define_tubelet_ops"]
