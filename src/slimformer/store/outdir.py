"""Output folders that never lose the user's files.

Every folder slimformer writes holds a marker file, :data:`MARKER`. A folder is only ever
replaced when it carries that marker; anything else at the output path (the user's own folder, a
file, the working directory or one of its parents, the home folder, ``/``) is refused with an
:class:`~slimformer.errors.OutputError` before any work is done.

Writing is staged: the new folder is built beside the old one (``.NAME.<random>.tmp``), under a
lock (``.NAME.lock``, an ``flock`` that dies with its process), and swapped in when complete:
with one atomic ``renameat2(RENAME_EXCHANGE)`` where the file system has it, else by two renames.
After SIGINT or SIGKILL at any moment the output path holds the previous complete output or
nothing; what a killed run left beside it is removed (or, for a previous output caught between
the two renames, put back) by the next run on that path.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import datetime as dt
import errno
import json
import os
import shutil
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slimformer.errors import OutputError

MARKER = ".slimformer-output"
STATE = "state"  # sub-folder of an output: resumable state (journals, checkpoints), carried over
MAX_PATH = 4096
MAX_NAME = 255
# the longest name slimformer puts beside an output: ``.NAME.<8 random>.part`` (also .tmp, .old)
SUFFIX_ROOM = len("..12345678.part")
_TMP, _OLD = ".tmp", ".old"


def _short(text: object, limit: int = 120) -> str:
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit - 20]}...({len(s)} chars)"


def format_dir(template: str, **fields: str) -> str:
    """Fill ``{field}`` placeholders of an output-path template; only ``fields`` are allowed.

    Raises:
        OutputError: An unknown, positional or malformed placeholder.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise OutputError(f"output dir {_short(template)!r}: {exc}; the only placeholders "
                          f"allowed are {', '.join('{' + f + '}' for f in fields)}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in fields or spec or conv:
            raise OutputError(f"output dir {_short(template)!r}: placeholder {{{name}}} is not "
                              f"allowed; the only ones are "
                              f"{', '.join('{' + f + '}' for f in fields)}")
    return template.format(**fields)


def is_output(path: str | Path) -> bool:
    """Whether ``path`` is a folder slimformer wrote (it holds the marker file)."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and (p / MARKER).is_file()


def _protected(resolved: Path) -> str | None:
    """Why ``resolved`` may never be an output folder, or None."""
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the file-system root"
    if resolved == cwd:
        return "it is the working directory"
    if resolved in cwd.parents:
        return "it is a parent of the working directory"
    home = Path.home().resolve()
    if resolved == home or resolved in home.parents:
        return "it is the home folder or one of its parents"
    return None


def check_output(path: str | Path, overwrite: bool = False, kind: str = "folder",
                 probe: bool = False) -> Path:
    """Check, before any work, that ``path`` may receive a new output; returns it.

    Allowed: a path that does not exist (its nearest existing parent must be writable: a
    temporary file is created there and removed), an empty folder, and with ``overwrite`` a
    folder slimformer wrote (``kind="folder"``) or an existing file (``kind="file"``). A file's
    folder must exist (a folder output is created with its parents). With
    ``probe`` (under the output's lock) an existing folder must also be renamable, as the new
    output replaces it by a rename.

    Raises:
        OutputError: What is at the path, why it is refused and the way out.
    """
    p = Path(path)
    text = str(path)
    if not text.strip():
        raise OutputError("output path is empty: give a folder such as runs/my-run")
    if len(os.fsencode(text)) > MAX_PATH or any(len(os.fsencode(part)) > MAX_NAME
                                                 for part in p.parts) \
            or len(os.fsencode(p.name)) > MAX_NAME - SUFFIX_ROOM:
        raise OutputError(f"output path {_short(text)!r} is too long (at most "
                          f"{MAX_NAME - SUFFIX_ROOM} bytes its last name: room is kept for "
                          f"the temporary files beside it; {MAX_NAME} a folder name, "
                          f"{MAX_PATH} in all)")
    if "\0" in text:
        raise OutputError("output path contains a NUL byte")
    resolved = p.resolve()
    why = _protected(resolved)
    if why is not None:
        raise OutputError(f"output path {text!r} is refused: {why}; slimformer replaces its "
                          "output folder as a whole, so give a new sub-folder such as "
                          "runs/my-run")
    if p.is_symlink():
        raise OutputError(f"output path {text!r} is a symbolic link; give the real path or a "
                          "new folder")
    if kind == "file":
        if p.is_dir():
            raise OutputError(f"output path {text!r} is a folder; give a file name")
        if not p.parent.exists():  # a typo must not create a chain of folders
            raise OutputError(f"output file {text!r}: its folder {str(p.parent)!r} does not "
                              "exist; create it first or give a path in an existing folder")
        if p.exists() and not overwrite:
            raise OutputError(f"output file {text!r} exists; pass --overwrite (API: "
                              "overwrite=True) to replace it, or give another path")
    elif p.exists():
        if not p.is_dir():
            raise OutputError(f"output path {text!r} is a file, not a folder; slimformer does "
                              "not replace files it did not write: give another path")
        if is_output(p) and _marker_state(p) == "state":
            pass  # only the resumable state of an unfinished run: continue it
        elif is_output(p):
            if not overwrite:
                raise OutputError(f"output folder {text!r} holds an earlier slimformer output; "
                                  "pass --overwrite (recipe: output.overwrite: true) to replace "
                                  "it, or give another path")
        elif any(p.iterdir()):
            raise OutputError(f"output folder {text!r} exists and was not written by "
                              f"slimformer (no {MARKER} file in it); slimformer never replaces "
                              "folders it did not write: give a new path")
    _check_writable(p)
    if probe and kind == "folder" and p.is_dir():
        _check_movable(p)
    return p


def _check_movable(p: Path) -> None:
    """Refuse a folder output that cannot be renamed (it is replaced by a rename at the end).

    Probed by renaming it away and back; a run killed in between leaves ``.NAME.*.old``, which
    the next run on ``p`` puts back (an output) or removes (an empty folder).
    """
    probe = p.with_name(f".{p.name}.{os.getpid()}probe{_OLD}")
    try:
        os.rename(p, probe)
    except OSError as exc:
        raise OutputError(f"output folder {str(p)!r} cannot be replaced (renaming it failed: "
                          f"{exc.strerror or exc}); give a new path in a writable folder") \
            from None
    os.rename(probe, p)


def _check_writable(p: Path) -> None:
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {str(p)!r}: {parent} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write under {parent} for output {str(p)!r}: "
                          f"{exc.strerror or exc}; give a writable path") from None


def _marker_state(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("state")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def state_dir(path: str | Path) -> Path:
    """``path/state/``: what lets a run resume (search journals, super-networks, checkpoints).

    Created, with ``path`` marked as a slimformer output holding only state, when ``path`` is
    new; carried into each new output written at ``path`` (see :func:`staged_dir`).
    """
    path = Path(path)
    if not path.exists():
        path.mkdir(parents=True)
        _write_marker(path, "state")
    folder = path / STATE
    folder.mkdir(exist_ok=True)
    return folder


def _write_marker(folder: Path, state: str) -> None:
    from slimformer import __version__

    (folder / MARKER).write_text(json.dumps(
        {"slimformer": __version__, "state": state,
         "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
         "pid": os.getpid()}) + "\n", encoding="utf-8")


_HELD: dict[Path, int] = {}  # locks this process holds (flock is per open file, not reentrant)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``path`` (non-blocking ``flock``); refuse if another holds it."""
    import fcntl

    lock = path.with_name(f".{path.name}.lock")
    key = lock.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    for _ in range(20):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                try:
                    who = lock.read_text().strip()
                except OSError:
                    who = "?"
                raise OutputError(f"another slimformer process ({who or 'pid ?'}) is writing "
                                  f"{str(path)!r}; wait for it or give another path") from None
            raise
        try:  # the file may have been unlinked by its last holder between open and flock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:  # pragma: no cover - needs twenty lost races in a row
        raise OutputError(f"could not lock {lock}")
    _HELD[key] = 1
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _leftovers(path: Path) -> list[Path]:
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return []
    return [q for q in path.parent.iterdir()
            if q.name.startswith(prefix) and q.name.endswith((_TMP, _OLD)) and q.is_dir()
            and not q.is_symlink()]


def clean_leftovers(path: Path) -> list[str]:
    """Remove what killed runs left beside ``path``; put back an output caught mid-swap.

    Only folders named ``.NAME.*.tmp`` / ``.NAME.*.old`` that hold the marker (or are empty) are
    touched. Call with the lock held. Returns what was done, one line each.
    """
    done = []
    for q in sorted(_leftovers(path)):
        if not (q / MARKER).is_file():
            if not any(q.iterdir()):
                q.rmdir()
            continue
        if q.name.endswith(_OLD) and not path.exists():
            os.replace(q, path)
            done.append(f"restored the previous output of {path} from {q.name}")
        else:
            shutil.rmtree(q)
            done.append(f"removed {q.name}, left beside {path} by a stopped run")
    return done


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def reserve(path: str | Path, overwrite: bool = False, kind: str = "folder") -> Iterator[Path]:
    """Check ``path`` (see :func:`check_output`) and hold its lock for the whole block.

    Leftovers of killed runs beside a folder output are cleaned up first. Re-entrant within one
    process, so a command can reserve its output before any work and write it at the end.

    Raises:
        OutputError: ``path`` is refused or another process holds its lock.
    """
    path = Path(path)
    check_output(path, overwrite, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        if kind == "folder":
            clean_leftovers(path)
        check_output(path, overwrite, kind, probe=True)  # again, under the lock
        yield path


@contextlib.contextmanager
def staged_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a staging folder beside ``path``; on success it becomes ``path`` as a whole.

    The lock on ``path`` is held throughout. An existing ``path`` is replaced only when it is a
    slimformer output (and ``overwrite``); it is removed only after the new one is in place. On
    any exception (SIGINT included) the staging folder is removed and ``path`` is untouched.

    Raises:
        OutputError: ``path`` is refused (see :func:`check_output`) or locked by another run.
    """
    path = Path(path)
    with reserve(path, overwrite):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_TMP, dir=path.parent))
        try:
            _write_marker(tmp, "staging")
            yield tmp
            _write_marker(tmp, "complete")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_in(tmp: Path, path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # an empty folder the user made for us: nothing to keep
    if not path.exists():
        os.replace(tmp, path)
        return
    if not is_output(path):  # checked under the lock already; never delete a foreign folder
        raise OutputError(f"{path} changed while slimformer was writing: not replaced")
    if (path / STATE).is_dir() and not (tmp / STATE).exists():
        os.replace(path / STATE, tmp / STATE)  # resumable state stays with the output
    if _exchange(tmp, path):
        old = tmp  # after the exchange the staging name holds the previous output
    else:
        old = tmp.with_name(tmp.name[:-len(_TMP)] + _OLD)
        os.replace(path, old)
        os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


_SCRATCH: contextvars.ContextVar[Path | None] = contextvars.ContextVar("slimformer_scratch",
                                                                       default=None)


def scratch_root() -> str | None:
    """Where temporary files go now: the running output's scratch folder, or None (system temp).

    Pass it as ``dir=`` to :mod:`tempfile`; a killed run's scratch then lies inside its staging
    folder, which the next run on that output removes.
    """
    folder = _SCRATCH.get()
    return str(folder) if folder is not None else None


@contextlib.contextmanager
def scratch_in(folder: Path) -> Iterator[Path]:
    """Make ``folder`` (created) the scratch root for the block; removed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    token = _SCRATCH.set(folder)
    try:
        yield folder
    finally:
        _SCRATCH.reset(token)
        shutil.rmtree(folder, ignore_errors=True)
