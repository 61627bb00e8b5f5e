"""`python -m vivit_kernels.report`: a table a person reads, every reason said once."""

import re

from vivit_kernels import report


def test_each_reason_is_said_once_under_the_table(capsys, monkeypatch):
    monkeypatch.setattr(report, "VIVIT_B", dict(B=1, T=3, S=20, H=2, Dh=16))  # small: the table, not the figures
    report.main(["--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines[3:] if not line.startswith("[")]
    footnotes = [line for line in lines if line.startswith("[")]
    assert len(rows) == len(report.MODES) * len(report.backends.names())
    used = {mark for row in rows for mark in re.findall(r"\[\d+\]", row)}
    assert sorted(used) == sorted(line.split()[0] for line in footnotes)  # each used mark explained, once
    assert len(set(footnotes)) == len(footnotes)
    assert all(len(row) <= 80 for row in rows), rows
