"""`make mutate`'s hand-written kernel mutants (tools/mutants.py) still target the code: each one's
text occurs where and as often as it says, and names tests that exist. A kernel edit that moves
the text makes its mutant stale; this fails then, not the next (hours-long) mutation run."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
mutants = importlib.util.module_from_spec(_spec)
sys.modules["mutants"] = mutants  # dataclasses resolve annotations through the module
_spec.loader.exec_module(mutants)


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.id)
def test_each_kernel_mutant_applies(mutant, tmp_path):
    source = ROOT / mutant.path
    copy = tmp_path / mutant.path
    copy.parent.mkdir(parents=True)
    copy.write_text(source.read_text())
    original = mutants.apply(tmp_path, mutant)
    assert original == source.read_text()
    assert copy.read_text() != original and mutant.new in copy.read_text()
    for test in mutant.tests:
        path, _, name = test.partition("::")
        assert (ROOT / path).is_file(), test
        if name:
            assert re.search(rf"^def {re.escape(name)}\b", (ROOT / path).read_text(), re.M), test


def test_mutant_ids_are_unique():
    ids = [m.id for m in mutants.MUTANTS]
    assert len(ids) == len(set(ids))
