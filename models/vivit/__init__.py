"""ViViT models built on vivit_kernels."""
