"""Triton kernels (GPU; on CPU tensors only under the interpreter, TRITON_INTERPRET=1).

Importing this package needs triton; the backend module (`vivit_kernels.backends.triton`)
imports it lazily and reports "triton is not installed" instead of failing.
"""
