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
