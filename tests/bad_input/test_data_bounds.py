"""Bounded input: data paths that are no regular files, long lines, huge claims, deep JSON.

Each class gets a typed error naming the path and the limit, from the library and through the CLI
(exit 2, one line, no output left behind). Limits are lowered by monkeypatching
:mod:`slimformer.store.limits` so the files stay small.
"""

import io
import json
import os
import re
import shutil
import signal
import socket
import zipfile

import numpy as np
import pytest

from slimformer.data.source_spec import parse_source
from slimformer.data.sources import load_source
from slimformer.data.tabular import read_text_file
from slimformer.errors import ConfigError, DataError, ModelLoadError
from slimformer.store import limits

from .conftest import no_traceback


@pytest.fixture(autouse=True)
def no_hang():
    """Fail instead of hanging when something blocks (opening a FIFO blocks until a writer)."""
    def boom(*_):
        raise TimeoutError("blocked for 60 s: a FIFO was opened")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _fifo(tmp_path):
    os.mkfifo(tmp_path / "pipe.csv")
    return str(tmp_path / "pipe.csv")


def _link_to_zero(tmp_path):
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    return str(tmp_path / "zero.txt")


def _socket(tmp_path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "s.jsonl"))  # closed with the test's process; the file stays
    return str(tmp_path / "s.jsonl")


def _fifo_image(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    os.mkfifo(tmp_path / "imgs" / "cat" / "x.png")
    return json.dumps({"path": str(tmp_path / "imgs"), "size": 28, "mean": [0.5], "std": [0.5]})


NOT_REGULAR = [
    (_fifo, r"pipe.csv is a FIFO \(named pipe\); a data file must be a regular file"),
    (lambda _: json.dumps({"path": "/dev/zero", "kind": "text", "format": "txt"}),
     r"/dev/zero is a character device; a data file must be a regular file"),
    (_link_to_zero, r"zero.txt \(a link to /dev/zero\) is a character device; a data file must be "
                    r"a regular file"),
    (_socket, r"s.jsonl is a socket; a data file must be a regular file"),
    (_fifo_image, r"x.png is a FIFO \(named pipe\); an image file must be a regular file"),
]


def _source(arg: str):
    return json.loads(arg) if arg.startswith("{") else arg


@pytest.mark.parametrize("make, message", NOT_REGULAR)
def test_data_paths_must_be_regular_files(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_source(_source(make(tmp_path)))


def test_long_lines_and_big_text_files_name_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_LINE_BYTES", 64)
    ok, long = "a" * 60, "b" * 65
    csv = tmp_path / "t.csv"
    csv.write_text(f"text,label\n\"{ok}\",0\n\"{long}\",1\n")  # 64 bytes pass, 69 do not
    with pytest.raises(DataError, match=r"t.csv line 3: longer than 64 bytes \(the line limit, "
                                        r"slimformer.store.limits.MAX_LINE_BYTES\)"):
        load_source(str(csv))
    table = read_text_file(parse_source(str(csv)), limit=1)  # streamed: line 3 is never read
    assert table.columns == {"text": [ok], "label": ["0"]}
    for name, line in (("t.jsonl", json.dumps({"text": long})), ("t.txt", long)):
        (tmp_path / name).write_text(f"{line[:60]}\n{line}\n" if name == "t.txt" else
                                     f"{json.dumps({'text': 'x'})}\n{line}\n")
        with pytest.raises(DataError, match=rf"{name} line 2: longer than 64 bytes"):
            load_source(str(tmp_path / name), limit=5)
    monkeypatch.setattr(limits, "MAX_TEXT_BYTES", 1000)
    big = tmp_path / "big.txt"
    big.write_text("".join(f"row {i:05d}\n" for i in range(200)))  # 2,000 bytes
    with pytest.raises(DataError, match=r"big.txt: 2,000 bytes, over the text data limit of "
                                        r"1,000 bytes \(slimformer.store.limits.MAX_TEXT_BYTES\)"):
        load_source(str(big))
    with pytest.raises(DataError, match=r"big.txt: more than 1,000 bytes read by line 101"):
        load_source(str(big), limit=150)
    rows = read_text_file(parse_source(str(big)), limit=3)  # the first rows of a big file are fine
    assert rows.columns["text"] == ["row 00000", "row 00001", "row 00002"]


def test_image_size_is_bounded(tmp_path):
    with pytest.raises(ConfigError, match=r"size.*less than or equal to 4096"):
        parse_source({"path": str(tmp_path), "kind": "images", "size": 40000})
    assert parse_source({"path": str(tmp_path), "kind": "images", "size": 4096}).size == 4096
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "a.png")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "size": {"height": 40000, "width": 40000}}))
    with pytest.raises(DataError, match=r"preprocessor_config.json: size 40000 pixels a side is over "
                                        r"the limit of 4096"):
        load_source({"path": str(tmp_path / "imgs"), "processor": str(proc)})


def _npz_claiming(path, shape):
    """An .npz whose member header claims ``shape`` float32 but holds 16 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", buf.getvalue() + b"\0" * 16)


def test_npz_headers_are_checked_before_loading(tmp_path, monkeypatch):
    _npz_claiming(tmp_path / "huge.npz", (1_000_000, 1_000_000))
    with pytest.raises(DataError, match=r"huge.npz: key 'x' claims shape \(1000000, 1000000\) "
                                        r"\(4,000,000,000,000 bytes\) in a member of \d+ bytes"):
        load_source(str(tmp_path / "huge.npz"))
    _npz_claiming(tmp_path / "fits.npz", (4,))  # exactly the 16 bytes it holds
    assert load_source(str(tmp_path / "fits.npz")).inputs["x"].shape == (4,)
    monkeypatch.setattr(limits, "MAX_TENSOR_BYTES", 100)
    np.savez(tmp_path / "big.npz", x=np.zeros((5, 5), np.float32), labels=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"big.npz: 1\d\d bytes of arrays, over the limit of 100 "
                                        r"bytes for a tensor data file"):
        load_source(str(tmp_path / "big.npz"))


def _nested(depth: int) -> str:
    return json.dumps({"text": "a", "deep": "X"}).replace('"X"', "[" * depth + "]" * depth)


@pytest.mark.parametrize("depth", [64, 100_000])  # past the bound; past Python's recursion limit
def test_deep_json_lines_are_typed(tmp_path, depth):
    f = tmp_path / "d.jsonl"
    f.write_text(_nested(63) + "\n" + _nested(depth) + "\n")  # the object is one level more
    with pytest.raises(DataError, match=r"d.jsonl line 2: JSON nested more than 64 levels deep "
                                        r"\(the limit, slimformer.store.limits.MAX_JSON_DEPTH\)"):
        load_source({"path": str(f), "label": False})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real quantized folder of the zoo's smallest model."""
    from slimformer.data.datasets import get_dataset
    from slimformer.models.loading import load_model
    from slimformer.models.spec import ZooSpec
    from slimformer.quantize.api import quantize
    from slimformer.quantize.config import QuantConfig
    from slimformer.quantize.serialize import save_quantized

    spec = ZooSpec(name="vit-digits-seq")
    res = quantize(load_model(spec).module, QuantConfig(method="minmax"),
                   get_dataset("digits-seq", "calib", limit=16))
    out = tmp_path_factory.mktemp("saved") / "q"
    save_quantized(res.model, out, spec)
    return out


@pytest.mark.parametrize("depth", [65, 100_000])
def test_deep_or_huge_manifest_is_typed(saved, tmp_path, monkeypatch, depth):
    from slimformer.quantize.serialize import load_quantized

    q = tmp_path / "q"
    shutil.copytree(saved, q)
    f = q / "slimformer.json"
    text = f.read_text().rstrip()
    f.write_text(text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ModelLoadError, match=r"slimformer.json: JSON nested more than 64 levels"):
        load_quantized(q)
    f.write_text(text)
    monkeypatch.setattr(limits, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ModelLoadError, match=r"slimformer.json is [\d,]+ bytes, over the manifest "
                                             r"limit of 100 bytes"):
        load_quantized(q)


def _left(tmp_path, name):
    return sorted(p.name for p in tmp_path.iterdir() if name in p.name)


def _long_line(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\n" + "b" * 70 + ",1\n")
    return str(tmp_path / "t.csv")


def _huge_npz(tmp_path):
    _npz_claiming(tmp_path / "huge.npz", (1_000_000, 1_000_000))
    return str(tmp_path / "huge.npz")


def _deep_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(_nested(100_000) + "\n")
    return str(tmp_path / "d.jsonl")


CLI_CASES = [*NOT_REGULAR[:3],
             (_long_line, r"t.csv line 2: longer than 64 bytes \(the line limit"),
             (_huge_npz, r"huge.npz: key 'x' claims shape \(1000000, 1000000\)"),
             (_deep_line, r"d.jsonl line 1: JSON nested more than 64 levels deep")]


@pytest.mark.parametrize("make, message", CLI_CASES)
def test_cli_refuses_unbounded_data_and_writes_nothing(tmp_path, cli, monkeypatch, make, message):
    if make is _long_line:
        monkeypatch.setattr(limits, "MAX_LINE_BYTES", 64)
    res = cli("quantize", "vit-fmnist", "--data", make(tmp_path), "--out", tmp_path / "q",
              "--calib-samples", "16")
    assert res.exit_code == 2 and "error: DataError: " in res.output, res.output
    assert re.search(message, res.output), res.output
    no_traceback(res)
    assert _left(tmp_path, "q") == []


def test_cli_refuses_a_deep_manifest_and_writes_nothing(saved, tmp_path, cli):
    q = tmp_path / "q"
    shutil.copytree(saved, q)
    text = (q / "slimformer.json").read_text().rstrip()
    (q / "slimformer.json").write_text(text[:-1] + ', "deep": ' + "[" * 5000 + "]" * 5000 + "}")
    res = cli("export", "onnx", q, "--out", tmp_path / "m.onnx")
    assert res.exit_code == 2 and "error: ModelLoadError: " in res.output, res.output
    assert "JSON nested more than 64 levels deep" in res.output
    no_traceback(res)
    assert _left(tmp_path, "m.onnx") == []


def test_builtin_images_prepared_by_a_model_processor_are_bounded(tmp_path, monkeypatch):
    """Fashion-MNIST through a 224x224 RGB processor: refused past MAX_TENSOR_BYTES, not OOM."""
    from transformers import BitImageProcessor

    from slimformer.data.datasets import get_dataset

    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}
                      ).save_pretrained(tmp_path)
    monkeypatch.setattr(limits, "MAX_TENSOR_BYTES", 8 << 20)  # 8 MiB: 13 images of 3x224x224
    with pytest.raises(DataError, match=r"fashion-mnist test: 20 images prepared by the image "
                       r"processor .* \(3x224x224 each\) would take 11 MiB, over the limit of "
                       r"8 MiB \(slimformer.store.limits.MAX_TENSOR_BYTES\); use fewer rows"):
        get_dataset("fashion-mnist", "test", limit=20, processor=tmp_path)
    ds = get_dataset("fashion-mnist", "test", limit=13, processor=tmp_path)
    assert ds.inputs["pixel_values"].shape == (13, 3, 224, 224)
