"""pytest-benchmark suites: fused kernels against the naive einsum baseline (and torch SDPA, Conv3d)."""
