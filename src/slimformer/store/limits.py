"""Bounds on every file slimformer reads from the user, and the readers that keep to them.

All the limits live here (docs/errors.md lists them); each error names the limit it hit.

- Data paths must be regular files, or folders where a folder is expected: FIFOs, character or
  block devices and sockets are refused before anything opens them (symbolic links resolved), so
  ``/dev/zero`` or a named pipe can neither fill memory nor hang a run.
- Text data files are streamed line by line: no line longer than :data:`MAX_LINE_BYTES`, at most
  :data:`MAX_TEXT_BYTES` read in all (the first ``limit`` rows of a larger file are fine).
- JSON (a JSONL data line, an artifact's ``slimformer.json``) nests at most
  :data:`MAX_JSON_DEPTH` levels; a manifest is at most :data:`MAX_MANIFEST_BYTES`.
- Images are resized to at most :data:`MAX_IMAGE_SIZE` pixels a side; a tensor file holds at
  most :data:`MAX_TENSOR_BYTES` of array data (checked from its headers, before loading).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

MAX_LINE_BYTES = 1 << 20  # one line of a CSV / TSV / JSONL / text data file (1 MiB)
MAX_TEXT_BYTES = 1 << 30  # bytes read from one text data file (1 GiB)
MAX_JSON_DEPTH = 64  # nesting of a JSONL data line or of a manifest (ours nest 6 deep)
MAX_MANIFEST_BYTES = 64 << 20  # one slimformer.json (ours are kilobytes to a few MB)
MAX_IMAGE_SIZE = 4096  # pixels a side an image is resized to
MAX_TENSOR_BYTES = 4 << 30  # array data in one .npz / .safetensors data file (4 GiB)

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def mib(n: int) -> str:
    """``n`` bytes in words: ``"4 MiB"``, ``"1 GiB"``, ``"512 bytes"``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n:,} bytes"


def regular(path: str | Path, what: str, error: type[Exception], folder: bool = False) -> Path:
    """Check that ``path`` (symbolic links followed) is a regular file, or a folder if ``folder``.

    Only ``stat`` is called: nothing is opened, so a FIFO cannot block.

    Args:
        path: The path as the user gave it.
        what: What the path is for, for the message (``"a data file"``).
        error: The exception type to raise (``DataError``, ``ModelLoadError``).
        folder: Whether a folder is allowed (then a regular file is allowed too).

    Returns:
        The path.

    Raises:
        error: The path is missing, or is a FIFO, a device, a socket (or a folder where none
            is allowed), naming the path, what it resolves to and what is allowed.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise error(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISREG(st.st_mode) or (folder and stat.S_ISDIR(st.st_mode)):
        return p
    kind = "a folder" if stat.S_ISDIR(st.st_mode) else \
        next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
    target = os.path.realpath(p)
    via = f" (a link to {target})" if target != os.path.abspath(p) else ""
    allowed = "a regular file or a folder" if folder else "a regular file"
    raise error(f"{p}{via} is {kind}; {what} must be {allowed}")


def read_lines(path: str | Path, error: type[Exception], max_bytes: int | None = None,
               max_line: int | None = None) -> Iterator[tuple[int, str]]:
    r"""Stream the lines of a UTF-8 text file: ``(line number, text with its line ending)``.

    Lines end at ``\n`` only; a leading byte-order mark is dropped. The file is checked with
    :func:`regular` first and read as it is consumed, never whole.

    Args:
        path: The file.
        error: The exception type to raise.
        max_bytes: At most this many bytes are read (default :data:`MAX_TEXT_BYTES`).
        max_line: No line (without its ending) is longer (default :data:`MAX_LINE_BYTES`).

    Raises:
        error: Not a regular file, unreadable, not UTF-8 (naming the line), a line over
            ``max_line`` or more than ``max_bytes`` (naming the limit and the line).
    """
    max_bytes = MAX_TEXT_BYTES if max_bytes is None else max_bytes
    max_line = MAX_LINE_BYTES if max_line is None else max_line
    regular(path, "a text data file", error)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, also when the caller stops early
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    with f:
        total, number = 0, 0
        while True:
            try:
                raw = f.readline(max_line + 2)  # room for the content and "\r\n"
            except OSError as exc:
                raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
            if not raw:
                return
            number += 1
            total += len(raw)
            content = len(raw.rstrip(b"\r\n")) if raw.endswith(b"\n") else len(raw)
            if content > max_line:
                raise error(f"{path} line {number}: longer than {mib(max_line)} (the line limit, "
                            f"slimformer.store.limits.MAX_LINE_BYTES); split or shorten it")
            if total > max_bytes:
                raise error(f"{path}: more than {mib(max_bytes)} read by line {number} (the text "
                            f"data limit, slimformer.store.limits.MAX_TEXT_BYTES); take fewer "
                            f"rows (--limit, limit:) or split the file")
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{path} line {number}: not UTF-8 text ({exc.reason}); save the file "
                            f"as UTF-8") from None


def loads_json(text: str, where: str, error: type[Exception], max_depth: int | None = None):
    """``json.loads`` with a bound on nesting: a :class:`RecursionError` never escapes.

    Args:
        text: The JSON text.
        where: The file (and line) for messages.
        error: The exception type to raise for too deep a nesting.
        max_depth: Arrays and objects nest at most this deep (default :data:`MAX_JSON_DEPTH`).

    Raises:
        json.JSONDecodeError: Invalid JSON (the caller words it).
        error: Nesting past ``max_depth``.
    """
    max_depth = MAX_JSON_DEPTH if max_depth is None else max_depth
    deep = error(f"{where}: JSON nested more than {max_depth} levels deep (the limit, "
                 f"slimformer.store.limits.MAX_JSON_DEPTH)")
    try:
        value = json.loads(text)
    except RecursionError:
        raise deep from None
    if text.count("[") + text.count("{") <= max_depth:  # cannot nest deeper: skip the walk
        return value
    level = [value]
    for _ in range(max_depth):
        level = [c for v in level if isinstance(v, (dict, list))
                 for c in (v.values() if isinstance(v, dict) else v)]
        if not level:
            return value
    if any(isinstance(v, (dict, list)) for v in level):
        raise deep
    return value
