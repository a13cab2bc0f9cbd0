"""Plain progress lines off a terminal: start, quarters, end, with an estimated time left."""

import re

from slimformer.cli.common import _log_lines


def test_log_lines_show_quarters_and_an_eta_between_start_and_end(capsys):
    update = _log_lines()
    for done in range(9):
        update("calibrate", done, 8)
    lines = capsys.readouterr().err.splitlines()
    counts = [re.search(r"calibrate: (\d+)/8", line).group(1) for line in lines]
    assert counts == ["0", "2", "4", "6", "8"]  # start, each quarter, end: no line per tick
    middle = lines[1:-1]
    assert all(re.search(r"\(eta \d+ s\)$", line) for line in middle)
    assert "eta" not in lines[0] and "eta" not in lines[-1]


def test_log_lines_show_slow_items_and_only_slow_restarts(capsys, monkeypatch):
    import time as _time

    clock = [0.0]
    monkeypatch.setattr(_time, "perf_counter", lambda: clock[0])
    update = _log_lines(every=10.0)
    for done in range(41):  # 40 blocks of 3 s: a line at least every 10 s, not one per block
        update("calibrate", done, 40)
        clock[0] += 3.0
    lines = capsys.readouterr().err.splitlines()
    assert 8 <= len(lines) <= 16, lines
    at = [float(re.match(r"\[\s*([\d.]+) s\]", x).group(1)) for x in lines]
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert max(gaps) <= 12.0  # never silent much longer than `every`
    # a step that starts over each block (its sites): the first round as any step, the quick
    # rounds after it print nothing ...
    for _ in range(5):
        for done in range(4):
            update("sites", done, 3)
            clock[0] += 0.1
    lines = capsys.readouterr().err.splitlines()
    assert [re.search(r"sites: (\d)/3", x).group(1) for x in lines] == ["0", "1", "2", "3"]
    # ... a slow round shows its slow items and its end, with an eta
    for done in range(4):
        update("sites", done, 3)
        clock[0] += 6.0
    lines = capsys.readouterr().err.splitlines()
    assert [re.search(r"sites: (\d)/3", x).group(1) for x in lines] == ["2", "3"]
    assert "eta" in lines[0] and "eta" not in lines[-1]
