"""`make mutate`'s hand-written kernel mutants (tools/mutants.py) still target the code: each one's
marker comment (`# mutant: <id>`, `// mutant: <id>`) is in its file exactly once, the line it
marks holds the text the mutant changes, every marker in the kernels names a mutant, and each
names tests that exist. A kernel edit that drops a marker or rewrites its line makes the mutant
stale; this fails then, not the next (hours-long) mutation run."""

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
    original = source.read_text()
    assert len(re.findall(rf"{re.escape(mutants.marker(mutant))}(?![\w-])", original)) == 1, mutant.id
    assert mutants.apply(tmp_path, mutant) == original
    mutated = copy.read_text()
    assert mutated != original and mutant.new in mutated
    # Only the marked line changes.
    assert mutated.count("\n") == original.count("\n")
    changed = [i for i, (a, b) in enumerate(zip(original.splitlines(), mutated.splitlines())) if a != b]
    assert changed == [mutants.line_of(original, mutant) - 1]
    for test in mutant.tests:
        path, _, name = test.partition("::")
        assert (ROOT / path).is_file(), test
        if name:
            assert re.search(rf"^def {re.escape(name)}\b", (ROOT / path).read_text(), re.M), test


def test_mutant_ids_are_unique():
    ids = [m.id for m in mutants.MUTANTS]
    assert len(ids) == len(set(ids))


def test_every_marker_names_a_mutant_of_its_file():
    """A marker left behind (its mutant removed or renamed) would anchor nothing."""
    marked = {(m.path, m.id) for m in mutants.MUTANTS}
    sources = [*(ROOT / "csrc").iterdir(), *(ROOT / "vivit_kernels").rglob("*.py")]
    found = set()
    for source in sources:
        path = str(source.relative_to(ROOT))
        for mutant_id in mutants.markers_in(source.read_text(), mutants.comment_of(path)):
            assert (path, mutant_id) in marked, f"{path}: marker of an unknown mutant {mutant_id!r}"
            found.add((path, mutant_id))
    assert found == marked


def test_a_mutant_follows_its_marker_not_the_rest_of_the_file(tmp_path):
    """Code moved or renamed elsewhere in the file leaves the mutant applicable; a lost marker makes it stale."""
    mutant = next(m for m in mutants.MUTANTS if m.id == "tri-base")
    copy = tmp_path / mutant.path
    copy.parent.mkdir(parents=True)
    source = (ROOT / mutant.path).read_text()
    copy.write_text("# moved down\n\n" + source.replace("def _tokens(", "def _token_indices("))
    mutants.apply(tmp_path, mutant)
    assert "tok = g * GS + i * MS" in copy.read_text()
    copy.write_text(source.replace(mutants.marker(mutant), ""))
    with pytest.raises(ValueError, match="expected one marker"):
        mutants.apply(tmp_path, mutant)
