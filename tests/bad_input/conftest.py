import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimformer.cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli():
    """Invoke the CLI in-process; returns the result (exit_code, output)."""
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def slimformer(*args, cwd, **kw) -> subprocess.Popen:
    """The real CLI in a subprocess (for signals and concurrency)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "slimformer", *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kw)


def no_traceback(res) -> None:
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
