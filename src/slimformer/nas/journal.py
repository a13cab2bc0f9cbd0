"""The search journal survives a killed worker; storage failures name their file or server.

Optuna's journal file holds one JSON record per line and appends each write under a lock. A
worker killed in the middle of a write leaves a cut last line; Optuna appends the next record
onto it, and from then on nobody can read the study (``JSONDecodeError``). Before a journal is
opened, :func:`repair_journal` drops the cut record (no reader ever applied it: Optuna skips a
line without its newline) and, for a journal that an older version already damaged, keeps the
complete record appended onto such a line. The original is kept beside it as ``NAME.bak``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import traceback
from pathlib import Path

from slimformer.errors import SlimformerError, StageError

_RECORD = b'{"op_code":'  # every record of Optuna's journal starts so


def redact(url: str) -> str:
    """``url`` with its password (``user:password@``) hidden, for messages."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


def _good(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and bad UTF-8
        return False


def _salvage(line: bytes) -> bytes | None:
    """The complete record at the end of a line that holds a cut one before it, or None."""
    at = line.rfind(_RECORD)
    while at > 0:
        if _good(line[at:]):
            return line[at:]
        at = line.rfind(_RECORD, 0, at)
    return None


def repair_journal(path: str | Path, lock) -> str | None:
    """Drop the cut records of the journal file at ``path``; a note saying what it did, or None.

    Args:
        path: The journal file (may be missing or empty: nothing to do).
        lock: The journal's Optuna lock (``JournalFileOpenLock``); held while checking, so a
            record another live worker is writing is never taken for a cut one.

    Raises:
        OSError: The file cannot be read or rewritten (the caller names the file).
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    lock.acquire()
    try:
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with its newline
        keep, dropped, salvaged = [], 0 if not tail else 1, 0
        for line in lines:
            if not line.strip() or _good(line):
                keep.append(line)
                continue
            record = _salvage(line)
            dropped += 1
            if record is not None:
                keep.append(record)
                salvaged += 1
        if not dropped:
            return None
        backup = path.with_name(path.name + ".bak")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        backup.write_bytes(data)
        tmp.write_bytes(b"".join(line + b"\n" for line in keep))
        os.replace(tmp, path)
    finally:
        lock.release()
    kept = f", {salvaged} complete record(s) appended onto them kept" if salvaged else ""
    return (f"journal {str(path)!r}: dropped {dropped} record(s) cut off by a stopped worker"
            f"{kept}; the original is kept as {backup.name!r}")


def _from_storage(exc: BaseException) -> bool:
    """Whether ``exc`` came from Optuna's storage layer or the database driver under it."""
    if type(exc).__module__.split(".")[0] in ("sqlalchemy", "psycopg", "psycopg2", "pymysql"):
        return True
    if type(exc).__name__ == "StorageInternalError":
        return True
    return any("optuna/storages" in f.filename.replace(os.sep, "/")
               for f in traceback.extract_tb(exc.__traceback__))


@contextlib.contextmanager
def storage_errors(where: str):
    """Turn a failure of the study's storage ``where`` (file or URL) into a StageError naming it.

    Raises:
        StageError: The journal file cannot be read, or the database failed or went away.
    """
    try:
        yield
    except SlimformerError:
        raise
    except Exception as exc:  # noqa: BLE001 - filtered to storage failures by _from_storage
        if not _from_storage(exc):
            raise
        first = (str(exc).splitlines() or [""])[0][:200]
        if "://" in where:
            raise StageError(f"search storage: the database {redact(where)!r} failed "
                             f"({type(exc).__name__}: {first}); check that the server is up "
                             "and run the search again (measured trials are kept)") from None
        raise StageError(f"search storage: cannot read the journal file {where!r} "
                         f"({type(exc).__name__}: {first}); run the search again (a cut record "
                         "is repaired on opening, the original kept as .bak) or give another "
                         "--storage") from None
