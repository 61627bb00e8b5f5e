"""Every case family's builder, by the spec's "op": the one place that knows them all.

A new family is a module that imports only benchmarks/core.py and defines `<family>_case(spec) ->
Case`; adding it here makes the timed run (benchmarks/measure.py) and the child-process probe
(benchmarks/probe.py) build it.
"""

from __future__ import annotations

from collections.abc import Callable

from .attention import attention_case
from .core import Case
from .dropin import dropin_case
from .loader import loader_case
from .memory import memory_case
from .training import training_case
from .tubelet import tubelet_case

BUILDERS: dict[str, Callable[[dict], Case]] = {
    "attention": attention_case,
    "tubelet": tubelet_case,
    "training": training_case,
    "loader": loader_case,
    "dropin": dropin_case,
    "memory": memory_case,
}


def build(spec: dict) -> Case:
    """The Case of `spec`, by its builder."""
    return BUILDERS[spec["op"]](spec)
