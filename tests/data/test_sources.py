"""The user's own data: image folders, text files, tables, tensor files; checks, split, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from slimformer.data.datasets import TensorDictDataset, make_loader
from slimformer.data.sources import (
    BuiltinData,
    ImageFolderData,
    TableData,
    TensorFileData,
    TextFileData,
    load_source,
    parse_source,
    split_source,
)
from slimformer.data.text import minilm_path
from slimformer.data.text import tokenizer as minilm_tokenizer
from slimformer.errors import ConfigError, DataError
from slimformer.models.spec import InputSpec

TEXT_INPUTS = {"input_ids": InputSpec(shape=[1, 16], dtype="int64", high=30522),
               "attention_mask": InputSpec(shape=[1, 16], dtype="int64", high=2)}
GREY_INPUT = {"pixel_values": InputSpec(shape=[1, 1, 8, 8])}


def _png(path, value, size=(10, 12), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "imgs"
    for cls, values in {"dog": (10, 20, 30), "cat": (200, 210)}.items():
        for j, v in enumerate(values):
            _png(root / cls / f"{j}.png", v)
    (root / "cat" / ".hidden.png").write_bytes(b"not an image, skipped")
    (root / "dog" / "notes.txt").write_text("skipped: not an image suffix")
    return root


def test_image_class_folders_explicit_preprocessing(class_folder):
    spec = {"path": str(class_folder), "mean": [0.5], "std": [0.25]}
    ds = load_source(spec, GREY_INPUT)
    x = ds.inputs["pixel_values"]
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
    assert ds.classes == ("cat", "dog")
    # round-robin across classes: cat0, dog0, cat1, dog1, dog2
    assert ds.labels.tolist() == [0, 1, 0, 1, 1]
    expected = (torch.tensor([200, 10, 210, 20, 30]) / 255 - 0.5) / 0.25
    torch.testing.assert_close(x.mean((1, 2, 3)), expected, rtol=0, atol=1e-6)
    first2 = load_source(spec, GREY_INPUT, limit=2)
    assert first2.labels.tolist() == [0, 1]


def test_image_flat_folder_with_model_processor_config(tmp_path):
    for i, v in enumerate((0, 51, 255)):
        _png(tmp_path / "flat" / f"{i}.jpg", v, size=(20, 30), mode="RGB")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": 16, "width": 16}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    inputs = {"pixel_values": InputSpec(shape=[1, 3, 16, 16])}
    ds = load_source(str(tmp_path / "flat"), inputs, model_dir)
    assert not ds.has_labels and ds.inputs["pixel_values"].shape == (3, 3, 16, 16)
    # JPEG of a flat colour decodes to (nearly) that colour; normalised (v / 255 - 0.5) / 0.5
    means = ds.inputs["pixel_values"].mean((1, 2, 3))
    torch.testing.assert_close(means, torch.tensor([-1.0, 51 / 255 * 2 - 1, 1.0]), rtol=0, atol=0.02)
    _, labels = next(iter(make_loader(ds, 2)))
    assert labels.tolist() == [-1, -1]
    with pytest.raises(DataError, match=r"shape \(3, 16, 16\); the model takes \(3, 32, 32\)"):
        load_source(str(tmp_path / "flat"), {"pixel_values": InputSpec(shape=[1, 3, 32, 32])}, model_dir)


def test_image_errors(tmp_path, class_folder):
    bad = class_folder / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        load_source({"path": str(class_folder), "mean": [0], "std": [1]}, GREY_INPUT)
    bad.unlink()
    with pytest.raises(DataError, match="no preprocessor_config.json|no image processor config"):
        load_source(str(class_folder), GREY_INPUT)
    with pytest.raises(DataError, match="mean has 2 values; give 1 or 1"):
        load_source({"path": str(class_folder), "mean": [0, 0], "std": [1]}, GREY_INPUT)
    _png(class_folder / "loose.png", 3)
    with pytest.raises(DataError, match="both images .* and sub-folders"):
        load_source({"path": str(class_folder), "mean": [0], "std": [1]}, GREY_INPUT)
    (class_folder / "loose.png").unlink()
    with pytest.raises(DataError, match="'cat' not among the classes dog"):
        load_source({"path": str(class_folder), "mean": [0], "std": [1], "classes": ["dog"]}, GREY_INPUT)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_text_and_string_labels_match_the_tokenizer(tmp_path):
    rows = [("a fine film", "pos"), ("dull, long and, sadly, bad", "neg"), ('he said "wow"', "pos")]
    text = "text,label\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{y}\n' for t, y in rows)
    path = _write(tmp_path / "mine.csv", text)
    ds = load_source({"path": path, "max_length": 12}, TEXT_INPUTS, minilm_path())
    assert set(ds.inputs) == {"input_ids", "attention_mask"}
    assert ds.inputs["input_ids"].shape == (3, 12) and ds.inputs["input_ids"].dtype == torch.int64
    assert ds.classes == ("neg", "pos") and ds.labels.tolist() == [1, 0, 1]
    ref = minilm_tokenizer()([t for t, _ in rows], padding="max_length", max_length=12,
                             truncation=True, return_tensors="pt")
    assert torch.equal(ds.inputs["input_ids"], ref["input_ids"])
    longest = load_source({"path": path, "padding": "longest"}, TEXT_INPUTS, minilm_path())
    assert longest.inputs["input_ids"].shape[1] == int(ref["attention_mask"].sum(1).max())


def test_tsv_sentence_pairs_token_type_ids(tmp_path):
    path = _write(tmp_path / "pairs.tsv", "q\ta\ty\nwho is it\tme\t1\nwhere\there\t0\n")
    spec = {"path": path, "text": "q", "text_pair": "a", "label": "y", "max_length": 10}
    with_types = load_source(spec, None, minilm_path())
    assert set(with_types.inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert with_types.inputs["token_type_ids"][0].tolist()[:7] == [0, 0, 0, 0, 0, 1, 1]
    assert with_types.labels.tolist() == [1, 0] and with_types.classes is None
    dropped = load_source(spec, TEXT_INPUTS, minilm_path())
    assert "token_type_ids" not in dropped.inputs
    kept = load_source(spec, TEXT_INPUTS, minilm_path(), accepts=["token_type_ids"])
    assert torch.equal(kept.inputs["token_type_ids"], with_types.inputs["token_type_ids"])


def test_jsonl_and_txt(tmp_path):
    lines = [{"sentence": "one", "label": 2}, {"sentence": "two", "label": 0}, {"sentence": "x", "label": 1}]
    path = _write(tmp_path / "d.jsonl", "\n".join(map(json.dumps, lines)) + "\n\n")
    ds = load_source(path, TEXT_INPUTS, minilm_path(), limit=2)
    assert len(ds) == 2 and ds.labels.tolist() == [2, 0]
    txt = load_source(_write(tmp_path / "d.txt", "first line\n\nsecond line\n"), TEXT_INPUTS,
                      tokenizer_dir := minilm_path())
    assert len(txt) == 2 and not txt.has_labels
    no_label = load_source({"path": path, "label": False}, TEXT_INPUTS, tokenizer_dir)
    assert not no_label.has_labels


@pytest.mark.parametrize("content,message", [
    ("text,label\nfine,pos\ngood,\n", r"mine.csv line 3: column 'label' is empty"),
    ("text,label\nfine,pos\n,neg\n", r"mine.csv line 3: column 'text' is empty"),
    ("txt,id,label\nfine,1,pos\n", r"which column is the text\? give text: COLUMN; its columns: 'txt', "),
    ("text,label\n\"multi\nline\",pos\nbad,row,extra\n", r"mine.csv line 4: 3 fields, the header has 2"),
    ("text,label\n", r"mine.csv: no data rows"),
    ("text,text\na,b\n", r"line 1: the header needs unique"),
])
def test_csv_errors_name_file_line_and_column(tmp_path, content, message):
    path = _write(tmp_path / "mine.csv", content)
    with pytest.raises(DataError, match=message):
        load_source(path, TEXT_INPUTS, minilm_path())


def test_text_errors(tmp_path):
    tok = minilm_path()
    csv_path = _write(tmp_path / "mine.csv", "text,label\nfine,pos\n")
    with pytest.raises(DataError, match=r"no label column 'y'; its columns: 'text', 'label'"):
        load_source({"path": csv_path, "label": "y"}, TEXT_INPUTS, tok)
    with pytest.raises(DataError, match=r"line 2: column 'label' holds 'pos', not one of the classes \(neg"):
        load_source({"path": csv_path, "classes": ["neg"]}, TEXT_INPUTS, tok)
    with pytest.raises(DataError, match="give tokenizer: FOLDER"):
        load_source(csv_path, TEXT_INPUTS)
    with pytest.raises(DataError, match="cannot load a tokenizer from"):
        load_source({"path": csv_path, "tokenizer": str(tmp_path)}, TEXT_INPUTS)
    jl = _write(tmp_path / "d.jsonl", '{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"d.jsonl line 3: not valid JSON"):
        load_source(jl, TEXT_INPUTS, tok)
    jl = _write(tmp_path / "e.jsonl", '{"text": "ok", "label": 1}\n{"text": "no", "label": 1.5}\n')
    with pytest.raises(DataError, match=r"e.jsonl line 2: column 'label' holds 1.5"):
        load_source(jl, TEXT_INPUTS, tok)
    raw = tmp_path / "latin.txt"
    raw.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(DataError, match="latin.txt line 2: not UTF-8"):
        load_source(str(raw), TEXT_INPUTS, tok)
    small_vocab = {**TEXT_INPUTS, "input_ids": InputSpec(shape=[1, 16], dtype="int64", high=1000)}
    with pytest.raises(DataError, match=r"'input_ids' row 1 holds \d+; the model takes values in \[0, 1000"):
        load_source(csv_path, small_vocab, tok)


def test_parquet_arrow_and_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"sentence": ["a good one", "a bad one", "meh"], "label": ["pos", "neg", "pos"],
                      "x": [[0.5, 1.0], [2.0, 3.0], [4.0, 5.0]]})
    pq.write_table(table, tmp_path / "d.parquet")
    ds = load_source(str(tmp_path / "d.parquet"), TEXT_INPUTS, minilm_path())
    assert ds.inputs["input_ids"].shape == (3, 128) and ds.labels.tolist() == [1, 0, 1]
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    num = load_source({"path": str(tmp_path / "d.arrow"), "inputs": {"x": "x"}, "label": False},
                      {"x": InputSpec(shape=[1, 2])})
    assert torch.equal(num.inputs["x"], torch.tensor([[0.5, 1.0], [2.0, 3.0], [4.0, 5.0]]))
    with pytest.raises(DataError, match=r"no input column 'z'; its columns: 'sentence', 'label', 'x'"):
        load_source({"path": str(tmp_path / "d.arrow"), "inputs": {"x": "z"}})
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    hf = datasets.Dataset.from_dict({"text": ["nice", "awful", "great"], "label": [1, 0, 1]}, features)
    datasets.DatasetDict({"train": hf, "test": hf.select([2, 1])}).save_to_disk(str(tmp_path / "saved"))
    spec = parse_source({"path": str(tmp_path / "saved"), "split": "test"})
    assert isinstance(spec, TableData)
    test = load_source(spec, TEXT_INPUTS, minilm_path())
    assert test.labels.tolist() == [1, 0] and test.classes == ("neg", "pos")
    with pytest.raises(DataError, match="a DatasetDict with splits train, test; give split: NAME"):
        load_source(str(tmp_path / "saved"), TEXT_INPUTS, minilm_path())
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="junk.parquet: cannot read as a table"):
        load_source(str(tmp_path / "junk.parquet"), TEXT_INPUTS, minilm_path())


def test_tensor_files(tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(6, 4, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    save_file({"x": x, "labels": y}, tmp_path / "d.safetensors")
    np.savez(tmp_path / "d.npz", x=x.double().numpy(), labels=y.int().numpy())
    model = {"x": InputSpec(shape=[1, 8, 3])}
    for name in ("d.safetensors", "d.npz"):
        ds = load_source(str(tmp_path / name), model)
        assert torch.equal(ds.inputs["x"], x) and ds.inputs["x"].dtype == torch.float32
        assert ds.labels.tolist() == y.tolist()
    with pytest.raises(DataError, match=r"rows have shape \(4, 3\); the model takes \(4, 8\)"):
        load_source(str(tmp_path / "d.npz"), {"x": InputSpec(shape=[1, 4, 8])})
    with pytest.raises(DataError, match=r"'x' is not an input of the model; the model's inputs: src"):
        load_source(str(tmp_path / "d.npz"), {"src": InputSpec(shape=[1, 8, 3])})
    with pytest.raises(DataError, match=r"input 'x' is float32; the model takes int64"):
        load_source(str(tmp_path / "d.npz"), {"x": InputSpec(shape=[1, 4, 3], dtype="int64")})
    x[4, 1, 2] = float("nan")
    save_file({"x": x}, tmp_path / "nan.safetensors")
    with pytest.raises(DataError, match=r"nan.safetensors: key 'x' holds NaN or inf \(row 5\)"):
        load_source(str(tmp_path / "nan.safetensors"), model)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="obj.npz: cannot read as .npz"):
        load_source(str(tmp_path / "obj.npz"), model)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "d.safetensors").read_bytes()[:40])
    with pytest.raises(DataError, match="cut.safetensors: not a valid .safetensors file"):
        load_source(str(tmp_path / "cut.safetensors"), model)
    np.savez(tmp_path / "ragged.npz", x=np.zeros((3, 2)), labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="keys differ in rows"):
        load_source(str(tmp_path / "ragged.npz"))
    np.savez(tmp_path / "lab.npz", inp=np.zeros((3, 2)), y=np.array([0.5, 1, 2]))
    with pytest.raises(DataError, match="key 'y' must hold \\(N,\\) integer class indices"):
        load_source({"path": str(tmp_path / "lab.npz"), "label": "y"})


def test_split_is_seeded_and_disjoint():
    ds = TensorDictDataset({"x": torch.arange(50).float()[:, None]}, None)
    calib, rest = split_source(ds, 12, seed=3)
    a, b = calib.inputs["x"][:, 0].long().tolist(), rest.inputs["x"][:, 0].long().tolist()
    assert len(a) == 12 and len(b) == 38 and not set(a) & set(b) and sorted(a + b) == list(range(50))
    assert a == sorted(a) and split_source(ds, 12, seed=3)[0].inputs["x"].equal(calib.inputs["x"])
    assert not split_source(ds, 12, seed=4)[0].inputs["x"].equal(calib.inputs["x"])
    for bad in (0, 50):
        with pytest.raises(DataError, match="give 1 to 49"):
            split_source(ds, bad)


def test_labelled_dataset_unchanged_and_select():
    ds = TensorDictDataset({"x": torch.zeros(4, 2)}, torch.tensor([3, 1, 2, 0]), ("a", "b", "c", "d"))
    assert ds.has_labels and len(ds) == 4 and int(ds[1][1]) == 1
    sub = ds.select(torch.tensor([0, 2]))
    assert sub.labels.tolist() == [3, 2] and sub.classes == ds.classes
    with pytest.raises(DataError, match="differ in length"):
        TensorDictDataset({"x": torch.zeros(3, 2)}, torch.zeros(4))


def test_parse_source_infers_the_kind(tmp_path):
    (tmp_path / "imgs").mkdir()
    assert isinstance(parse_source("digits-seq"), BuiltinData)
    assert isinstance(parse_source(str(tmp_path / "imgs")), ImageFolderData)
    assert isinstance(parse_source("some/file.TSV"), TextFileData)
    assert isinstance(parse_source("x.npz"), TensorFileData)
    assert isinstance(parse_source({"kind": "text", "path": "x.dat", "format": "csv"}), TextFileData)
    with pytest.raises(ConfigError, match="does not exist .* and is no built-in data set"):
        parse_source(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="text.colour: Extra inputs are not permitted"):
        parse_source({"path": "a.csv", "colour": 1})
    with pytest.raises(ConfigError, match="cannot tell the kind of data"):
        parse_source(_write(tmp_path / "d.xlsx", ""))
    ds = load_source({"name": "digits-seq", "split": "calib"}, {"x": InputSpec(shape=[1, 8, 8])}, limit=5)
    assert len(ds) == 5 and ds.classes[:2] == ("0", "1")
    with pytest.raises(DataError, match="no such file or folder"):
        load_source(TextFileData(path=str(tmp_path / "gone.csv")))


def test_hf_image_model_directory_end_to_end(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from slimformer.models.loading import load_model, parse_model_arg

    vit = ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2))
    vit.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    for cls in ("a", "b"):
        for i in range(3):
            _png(tmp_path / "imgs" / cls / f"{i}.png", 40 * i, size=(40, 50), mode="RGB")
    lm = load_model(parse_model_arg(str(tmp_path / "vit")))
    ds = load_source(str(tmp_path / "imgs"), lm.input_specs, lm.spec.path)
    calib, rest = split_source(ds, 2, seed=0)
    inputs, labels = next(iter(make_loader(rest, 8)))
    assert inputs["pixel_values"].shape == (4, 3, 32, 32) and len(calib) == 2
    with torch.no_grad():
        assert lm.module(**inputs).logits.shape == (4, 2)
    assert sorted(labels.tolist() + calib.labels.tolist()) == [0, 0, 0, 1, 1, 1]
