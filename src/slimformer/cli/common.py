"""What every command shares: errors as one red line, consoles, progress, tables, bounds."""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager

import typer
from typer.exceptions import TyperException

from slimformer.errors import SlimformerError

DEBUG_ENV = "SLIMFORMER_DEBUG"
CACHE_ENV = "SLIMFORMER_CACHE"  # real zoo models are built under $SLIMFORMER_CACHE/zoo
_debug = {"on": False}
_trust = {"on": False}
_quiet = {"on": False}
_said: set[str] = set()  # factories a note already named (one note per factory and process)


def _debugging() -> bool:
    return _debug["on"] or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _external_errors() -> tuple[type[BaseException], ...]:
    """Library exceptions that bad input causes (only of libraries already imported)."""
    found: list[type[BaseException]] = [OSError, UnicodeError, json.JSONDecodeError]
    for mod, names in (("yaml", ("YAMLError",)), ("pickle", ("UnpicklingError",)),
                       ("safetensors", ("SafetensorError",)),
                       ("google.protobuf.message", ("DecodeError",)),
                       ("onnx.checker", ("ValidationError",)),
                       ("onnx.onnx_cpp2py_export.checker", ("ValidationError",)),
                       ("optuna.exceptions", ("OptunaError",)),
                       ("sqlalchemy.exc", ("SQLAlchemyError",))):
        m = sys.modules.get(mod)
        for n in names:
            cls = getattr(m, n, None) if m is not None else None
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


@contextmanager
def _errors():
    """Every failure ends in one red line and an exit status, never a traceback.

    slimformer's typed errors and the library errors bad input causes (file access, decoding,
    JSON, YAML, safetensors, ONNX/protobuf, Optuna storage, unpickling) exit 2; anything else is
    a bug: exit 1 with a request to report it. ``--debug`` (or ``SLIMFORMER_DEBUG=1``) re-raises
    with the traceback instead.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, TyperException):
        raise
    except KeyboardInterrupt:
        if _debugging():
            raise
        _console()[1].print("[bold red]interrupted[/]: nothing was written to the output path "
                            "(a previous output there is unchanged)", markup=True)
        raise typer.Exit(130) from None
    except SlimformerError as exc:
        if _debugging():
            raise
        _fail(f"{type(exc).__name__}: {exc}")
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: nothing escapes as a traceback
        if _debugging():
            raise
        if isinstance(exc, _external_errors()):
            _fail(f"{type(exc).__name__}: {_short(exc)} (--debug shows the traceback)")
            raise typer.Exit(2) from None
        _fail(f"internal error ({type(exc).__name__}: {_short(exc)}); this is a bug in "
              "slimformer: run again with --debug and report the traceback")
        raise typer.Exit(1) from None


def _short(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip() or repr(exc)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _fail(message: str) -> None:
    _, err = _console()
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)


class _Typer(typer.Typer):
    """A Typer whose commands all run inside :func:`_errors` (no traceback ever escapes)."""

    def command(self, *args, **kwargs):  # noqa: D102 - same as typer.Typer.command
        register = super().command(*args, **kwargs)

        def decorate(fn):
            @functools.wraps(fn)
            def guarded(*a, **k):
                with _errors():
                    return fn(*a, **k)

            register(guarded)
            return fn

        return decorate



def _note(text: str) -> None:
    _console()[1].print(f"[bold]note:[/] {text}", markup=True, highlight=False, soft_wrap=True)



def _console():
    from rich.console import Console

    # pipes and captured output get a wide console so tables keep whole module paths on a line
    wide = None if sys.stdout.isatty() else 200
    return Console(width=wide), Console(stderr=True, width=wide)


@contextmanager
def _progress():
    """Yields a ``progress(description, completed, total)`` callback for long steps.

    A rich progress bar on a terminal; plain log lines on stderr otherwise (a step's start, each
    quarter and its end, with the elapsed time); nothing with ``--quiet``.
    """
    if _quiet["on"]:
        yield lambda *a: None
        return
    if not sys.stderr.isatty():
        yield _log_lines()
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        yield update


def _log_lines(every: float = 10.0):
    """A progress callback printing plain lines (for logs and CI).

    A step's start, each quarter and its end; between them also a line whenever ``every``
    seconds passed since the step's last line (a long calibration shows each block or site).
    Lines between start and end carry the estimated time left (``eta 12 s``), from the step's
    own elapsed time and the fraction done. A step that starts over (``done`` lower than before:
    the sites of the next block) prints only its slow lines: one every ``every`` seconds, and its
    end when it took that long.
    """
    import time

    t0 = time.perf_counter()
    state: dict[str, dict] = {}  # desc -> started, last line time, quarter shown, done, round

    def update(desc: str, done: int, total: int) -> None:
        now = time.perf_counter()
        st = state.get(desc)
        if st is None or done < st["done"]:  # a new step, or the step started over
            again = st is not None
            st = state[desc] = {"started": now, "line": now if again else None, "quarter": -1,
                                "done": done, "again": again}
        st["done"] = done
        quarter = 4 * done // total if total else 4
        slow = st["line"] is not None and now - st["line"] >= every and done > 0
        if st["again"]:
            show = slow or (quarter == 4 and now - st["started"] >= every)
        else:
            show = quarter > st["quarter"] or slow
        if not show:
            return
        st["quarter"], st["line"] = max(quarter, st["quarter"]), now
        eta = ""
        if 0 < done < total:
            eta = f" (eta {(now - st['started']) * (total - done) / done:.0f} s)"
        print(f"[{now - t0:7.1f} s] {desc}: {done}/{total}{eta}", file=sys.stderr, flush=True)

    return update


def _table(*headers: str, title: str | None = None):
    """A rich table whose cells fold instead of being cut in narrow terminals."""
    from rich.table import Column, Table

    return Table(*(Column(h, overflow="fold") for h in headers), title=title)



def _say_code(con, recipe) -> None:
    """Notes before a run: a factory the recipe runs, quantize settings slow for the export.

    One line when the recipe names a factory (running it imports and calls that code), and one
    per quantize setting that makes a later export slow on its target.
    """
    for target in recipe.code_it_runs():
        if target not in _said:
            _said.add(target)
            con.print(f"note: this recipe runs code: model.factory {target!r} is imported and "
                      "called when the model loads", markup=False, highlight=False)
    for line in recipe.slow_settings():
        con.print(f"note: slow for the export target: {line}", markup=False, highlight=False)



def _int_option(text: str, what: str) -> int:
    from slimformer.errors import ConfigError

    try:
        return int(text)
    except ValueError:
        raise ConfigError([f"--{what}: expected an integer or auto, got {text!r}"],
                          "options") from None


def _ints(text: str, what: str) -> list[int]:
    from slimformer.errors import ConfigError

    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 3 or not 0 < vals[0] <= vals[1] <= vals[2]:
        raise ConfigError([f"--{what}: expected min,opt,max with 0 < min <= opt <= max, got "
                           f"{text!r}"], "options")
    return vals


def _bounded(**options: tuple[float | None, float, float]) -> None:
    """Refuse numeric options outside their ranges: ``name=(value, lowest, highest)``.

    Raises:
        ConfigError: Every option (``--name``) out of range, with its allowed range.
    """
    from slimformer.errors import ConfigError

    bad = [f"--{k.replace('_', '-')}: {v} is out of range; allowed: {lo:g} to {hi:g}"
           for k, (v, lo, hi) in options.items() if v is not None and not lo <= v <= hi]
    if bad:
        raise ConfigError(bad, "options")
