"""SHA-256 integrity of saved folders, and fingerprints of models and data for checkpoints.

A saved folder's JSON manifest carries an ``integrity`` section: the SHA-256 and size of every
file it names and the SHA-256 of each other top-level section of the manifest. :func:`verify`
checks them before anything is built from the folder and names the file or section that
differs. :func:`tensor_digest`, :func:`module_fingerprint` and :func:`data_fingerprint` hash
tensor bytes, so a checkpoint can be tied to the exact weights and data it was made from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from slimformer.errors import ModelLoadError
from slimformer.store import limits

INTEGRITY = "integrity"
_CHUNK = 1 << 20
# torch dtype name -> safetensors header dtype, for the dtypes slimformer writes
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
             "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
             "bool": "BOOL"}


def st_dtype(dtype) -> str:
    """The safetensors name (``"F32"``, ``"U8"`` ...) of a torch dtype; ``"?"`` if unknown."""
    return ST_DTYPES.get(str(dtype).removeprefix("torch."), "?")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(value) -> str:
    """Hex SHA-256 of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(meta: dict, folder: str | Path, files: Iterable[str]) -> dict:
    """``meta`` plus an ``integrity`` section for ``files`` (names inside ``folder``)."""
    folder = Path(folder)
    body = {k: v for k, v in meta.items() if k != INTEGRITY}
    record = {"files": {name: {"sha256": sha256_file(folder / name),
                               "bytes": (folder / name).stat().st_size} for name in files},
              "sections": {k: sha256_json(v) for k, v in body.items()}}
    return {**body, INTEGRITY: record}


def read_manifest(path: str | Path, required: Iterable[str] = (),
                  redo: str = "re-save the folder") -> dict:
    """Read a JSON manifest; every way it can be unreadable is a :class:`ModelLoadError`.

    ``redo`` (the way out) ends the messages about a damaged file.

    Raises:
        ModelLoadError: Missing or unreadable file, not a regular file, over
            :data:`~slimformer.store.limits.MAX_MANIFEST_BYTES`, not UTF-8, invalid JSON or
            nested past :data:`~slimformer.store.limits.MAX_JSON_DEPTH`, not a mapping, or one
            of the ``required`` keys absent.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist")
    size = limits.regular(path, "a manifest", ModelLoadError).stat().st_size
    if size > limits.MAX_MANIFEST_BYTES:
        raise ModelLoadError(f"{path} is {size:,} bytes, over the manifest limit of "
                             f"{limits.mib(limits.MAX_MANIFEST_BYTES)} "
                             f"(slimformer.store.limits.MAX_MANIFEST_BYTES): not one slimformer "
                             f"wrote; {redo}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path} is not UTF-8 text (byte {exc.start}): damaged; "
                             f"{redo}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        meta = limits.loads_json(text, str(path), ModelLoadError)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                             f"{exc.colno}): truncated or edited; {redo}") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ModelLoadError(f"{path} lacks the key(s) {', '.join(missing)}: truncated or "
                             f"edited; {redo}")
    return meta


def verify(meta: dict, folder: str | Path, manifest: str, redo: str) -> None:
    """Check the ``integrity`` section of ``meta`` (read from ``folder / manifest``).

    Args:
        meta: The manifest as read.
        folder: The folder holding the manifest and the files it names.
        manifest: The manifest's file name (for messages).
        redo: How to make the folder again (ends every message), e.g. ``"re-save it with
            save_quantized"``.

    Raises:
        ModelLoadError: No integrity record; a section changed, added or removed; a file
            missing, of another size or with another SHA-256 than recorded.
    """
    folder = Path(folder)
    where = folder / manifest
    rec = meta.get(INTEGRITY)
    if not (isinstance(rec, dict) and isinstance(rec.get("files"), dict)
            and isinstance(rec.get("sections"), dict)):
        raise ModelLoadError(f"{where} has no valid integrity record (file hashes); {redo}")
    body = {k: v for k, v in meta.items() if k != INTEGRITY}
    for key in sorted(set(rec["sections"]) | set(body)):
        if key not in body:
            raise ModelLoadError(f"{where}: section {key!r} was removed after saving; {redo}")
        if key not in rec["sections"]:
            raise ModelLoadError(f"{where}: section {key!r} was added after saving; {redo}")
        if sha256_json(body[key]) != rec["sections"][key]:
            raise ModelLoadError(f"{where}: section {key!r} was edited after saving (its SHA-256 "
                                 f"differs from the one recorded at save); {redo}")
    for name, want in rec["files"].items():
        path = folder / name
        if not isinstance(want, dict) or not {"sha256", "bytes"} <= set(want):
            raise ModelLoadError(f"{where}: the integrity record of {name} is malformed; {redo}")
        if Path(name).name != name:
            raise ModelLoadError(f"{where}: file name {name!r} is not a plain name; {redo}")
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; {redo}")
        size = path.stat().st_size
        if size != want["bytes"]:
            how = "truncated or edited" if size < want["bytes"] else "edited or appended to"
            raise ModelLoadError(f"{path} is {size:,} bytes, {want['bytes']:,} were recorded at "
                                 f"save ({how}); {redo}")
        if sha256_file(path) != want["sha256"]:
            raise ModelLoadError(f"{path}: content differs from the SHA-256 recorded at save "
                                 f"(changed after saving); {redo}")


def tensor_manifest(path: str | Path, redo: str = "re-save the folder") -> dict[str, dict]:
    """``{name: {"dtype": "F32", "shape": [...]}}`` read from a safetensors file's header.

    Raises:
        ModelLoadError: The file is not a valid safetensors file.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(k)
                out[k] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape())}
            return out
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise ModelLoadError(f"{path} is not a valid safetensors file "
                             f"({str(exc)[:200]}); {redo}") from None


def read_sealed(directory: str | Path, manifest: str, tensors: str, keys: Iterable[str],
                version: int, redo: str, kind: str = "model") -> dict:
    """Read a saved model folder's manifest and check it before anything is built from it.

    Checks, in order: both files exist; the manifest is a JSON object of format ``version``
    with ``keys``; the integrity record (:func:`verify`); the safetensors header equals the
    manifest's ``tensors`` record (``{name: {"dtype", "shape"}}``). ``kind`` names what the
    folder holds in messages (``"quantized model"``).

    Raises:
        ModelLoadError: Naming the file and what differs, ending with ``redo``.
    """
    directory = Path(directory)
    meta_path, tensors_path = directory / manifest, directory / tensors
    if not meta_path.is_file() or not tensors_path.is_file():
        raise ModelLoadError(f"{directory} is not a saved {kind} (needs {manifest} and "
                             f"{tensors})")
    meta = read_manifest(meta_path, ("format_version",), redo)
    have = meta["format_version"]
    if have != version:
        old = isinstance(have, int) and have < version
        raise ModelLoadError(f"{meta_path}: format version {have!r}, this slimformer reads "
                             f"{version}" + (f"; it was written by an older slimformer without "
                                             f"file hashes: {redo}" if old else ""))
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ModelLoadError(f"{meta_path} lacks the key(s) {', '.join(missing)}; {redo}")
    verify(meta, directory, manifest, redo)
    header, recorded = tensor_manifest(tensors_path, redo), meta.get("tensors")
    if not isinstance(recorded, dict):
        raise ModelLoadError(f"{meta_path}: 'tensors' must be a mapping; {redo}")
    if header != recorded:
        names = sorted(set(header) ^ set(recorded)) or sorted(
            k for k in header if header[k] != recorded[k])
        k = names[0]
        raise ModelLoadError(f"{tensors_path}: tensor {k!r} is {header.get(k, 'absent')} in the "
                             f"file but {recorded.get(k, 'absent')} in {manifest} "
                             f"({len(names)} tensor(s) differ); {redo}")
    return meta


def tensor_digest(named: Iterable[tuple[str, object]]) -> str:
    """Hex SHA-256 of ``(name, tensor)`` pairs: names, dtypes, shapes and raw bytes, in order."""
    import torch

    h = hashlib.sha256()
    for name, t in named:
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            flat = t.cpu().contiguous().reshape(-1)
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def module_fingerprint(module) -> str:
    """Hex SHA-256 of a module's ``state_dict`` (weights and buffers)."""
    return tensor_digest(module.state_dict().items())


def data_fingerprint(data) -> str:
    """Hex SHA-256 of a data set's tensors; ``"none"`` for no data.

    A ``TensorDictDataset`` (``.inputs`` mapping and ``.labels``) is hashed as a whole; any other
    indexable data set item by item (tensors inside dicts, tuples and lists).
    """
    if data is None:
        return "none"
    inputs, labels = getattr(data, "inputs", None), getattr(data, "labels", None)
    if isinstance(inputs, Mapping) and labels is not None:
        return tensor_digest([*sorted(inputs.items()), ("labels", labels)])
    return tensor_digest(_items(data))


def _items(data):
    import torch

    def walk(prefix, v):
        if isinstance(v, torch.Tensor):
            yield prefix, v
        elif isinstance(v, Mapping):
            for k in sorted(v):
                yield from walk(f"{prefix}.{k}", v[k])
        elif isinstance(v, (tuple, list)):
            for j, x in enumerate(v):
                yield from walk(f"{prefix}.{j}", x)
        else:
            yield prefix, torch.tensor(float(v)) if isinstance(v, (int, float)) else \
                torch.frombuffer(bytearray(repr(v).encode()), dtype=torch.uint8)

    for i in range(len(data)):
        yield from walk(str(i), data[i])


def load_keyed(path: Path, key: Mapping[str, str], parts: Mapping[str, str], what: str,
               kind: str, mismatch: str, way: str, fields: Iterable[str] = (),
               why: str = "") -> dict:
    """A torch checkpoint saved as ``{"key": key, ...}``, refused unless it is this run's.

    Read with ``weights_only=True``; ``key`` holds the model/data/config fingerprints and
    ``parts`` names each for messages; ``fields`` must be present.

    Raises:
        ModelLoadError: Unreadable (``what`` ``path`` ... not a slimformer ``kind``), without a
            fingerprint, keyed for another model / data / config (``mismatch`` names which,
            ``why`` says what resuming would do), or missing ``fields``; each with ``way`` out.
    """
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated/garbage files fail in pickle, zip or torch
        raise ModelLoadError(f"{what} {path} cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:160]}): damaged or not a slimformer {kind}; "
                             f"{way}") from None
    have = ck.get("key") if isinstance(ck, dict) else None
    if not isinstance(have, dict):
        raise ModelLoadError(f"{what} {path} has no model/data/config fingerprint (not written "
                             f"by this slimformer); {way}")
    diff = [parts[k] for k in parts if have.get(k) != key[k]]
    if diff:
        raise ModelLoadError(f"{what} {path} {mismatch} {' and another '.join(diff)}; {why}"
                             f"{way}")
    missing = [f for f in fields if f not in ck]
    if missing:
        raise ModelLoadError(f"{what} {path} lacks {', '.join(missing)}: damaged; {way}")
    return ck
