import os
import signal
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


def _sigint_default() -> None:
    """In the child: SIGINT as in a foreground terminal (a test run started in the background
    by a shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def slimformer(*args, cwd, **kw) -> subprocess.Popen:
    """The real CLI in a subprocess (for signals and concurrency), SIGINT at its default."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "slimformer", *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_sigint_default, **kw)


def no_traceback(res) -> None:
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
