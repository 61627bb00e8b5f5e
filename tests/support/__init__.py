"""Helpers the tests (and benchmarks) share that are not part of the product: video files written
with PyAV, and a second route to the bytes a model keeps for backward."""
