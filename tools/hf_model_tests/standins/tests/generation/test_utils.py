"""Stand-in for transformers' tests/generation/test_utils.py (not in its source distribution).

`test_modeling_common` imports `GenerationTesterMixin` only to check that generative models' test
classes derive from it; the video models of `python -m tools.hf_model_tests` generate nothing.
"""


class GenerationTesterMixin:
    pass
