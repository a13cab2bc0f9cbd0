"""Labels numbered in the model's class order and checked against its classes (data side)."""

import pytest
import torch
from PIL import Image

from slimformer.data.datasets import TensorDictDataset
from slimformer.data.labels import align_labels
from slimformer.data.sources import load_source
from slimformer.errors import DataError
from slimformer.models.spec import InputSpec

GREY = {"pixel_values": InputSpec(shape=[1, 1, 4, 4])}
MODEL_NAMES = ("pos", "neu", "neg")


def _folders(root, names, per_class=2):
    """Class folders of flat grey images; pixel value = 10 * (position of the name) + image."""
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.new("L", (4, 4), 10 * c + j).save(root / name / f"{j}.png")
    return {"path": str(root), "size": 4, "mean": [0.0], "std": [1 / 255]}


def _folder_of_rows(ds, names):
    """The folder name of each row, read back from its pixel value."""
    return [names[int(v) // 10] for v in ds.inputs["pixel_values"][:, 0, 0, 0].round()]


def test_folder_names_map_through_the_model_names(tmp_path):
    spec = _folders(tmp_path / "imgs", ["neg", "pos", "neu"])
    ds = load_source(spec, GREY)
    assert ds.classes == ("neg", "neu", "pos") and ds.label_names == "sorted"  # as read
    assert align_labels(ds, 3, MODEL_NAMES) is None
    assert ds.classes == MODEL_NAMES and ds.label_names is None
    rows = _folder_of_rows(ds, ["neg", "pos", "neu"])
    assert [MODEL_NAMES[y] for y in ds.labels.tolist()] == rows  # each row scored as its folder
    again = ds.labels.clone()
    align_labels(ds, 3, MODEL_NAMES)  # numbered once: a second call only checks
    assert torch.equal(ds.labels, again)


def test_names_equal_up_to_case_match(tmp_path):
    ds = load_source(_folders(tmp_path / "imgs", ["Bag", "coat"]), GREY)
    align_labels(ds, 3, ("coat", "shirt", "bag"))
    assert [("coat", "shirt", "bag")[y] for y in ds.labels.tolist()] == \
        [n.lower() for n in _folder_of_rows(ds, ["Bag", "coat"])]


def test_number_folders_are_indices_not_alphabetical(tmp_path):
    names = [str(i) for i in range(12)]  # sorted as text: 0, 1, 10, 11, 2, ...
    ds = load_source(_folders(tmp_path / "imgs", names, per_class=1), GREY)
    assert ds.classes[:3] == ("0", "1", "10")
    align_labels(ds, 12, [f"class {i}" for i in range(12)])  # names the folders do not use
    assert ds.labels.tolist() == [int(n) for n in _folder_of_rows(ds, names)]
    plain = load_source(_folders(tmp_path / "more", names, per_class=1), GREY)
    assert align_labels(plain, 12, None) is None  # no names, no note: numbers are indices
    assert plain.labels.tolist() == [int(n) for n in _folder_of_rows(plain, names)]


def _parquet(tmp_path, labels):
    """A table of one numeric input column ``x`` and string labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": [[float(i)] for i in range(len(labels))], "label": labels}), path)
    return load_source({"path": str(path), "inputs": {"x": "x"}})


def test_model_without_names_keeps_alphabetical_order_and_says_so(tmp_path):
    ds = _parquet(tmp_path, ["pos", "neg", "neu"])
    assert ds.label_names == "sorted"
    note = align_labels(ds, 3, None, where="t.parquet")
    assert ds.labels.tolist() == [2, 0, 1]  # neg 0, neu 1, pos 2
    assert "numbered alphabetically (0 neg, 1 neu, 2 pos)" in note and note.startswith("t.parquet")


def test_table_string_labels_map_through_the_model_names(tmp_path):
    ds = _parquet(tmp_path, ["pos", "neg", "neu", "pos"])
    assert align_labels(ds, 3, MODEL_NAMES) is None
    assert ds.labels.tolist() == [0, 2, 1, 0]  # the model's pos 0, neu 1, neg 2


def test_classes_list_gives_the_model_order(tmp_path):
    spec = {**_folders(tmp_path / "imgs", ["b", "a"]), "classes": ["b", "x", "a"]}
    ds = load_source(spec, GREY)
    assert ds.label_names == "given"
    align_labels(ds, 3, ("one", "two", "three"))  # the list wins over the model's names
    assert [["b", "x", "a"][y] for y in ds.labels.tolist()] == _folder_of_rows(ds, ["b", "a"])


def test_unknown_name_lists_both_sides(tmp_path):
    ds = load_source(_folders(tmp_path / "imgs", ["pos", "positive"]), GREY)
    with pytest.raises(DataError) as err:
        align_labels(ds, 3, MODEL_NAMES, where="imgs")
    msg = str(err.value)
    assert "'positive'" not in msg and "class name(s) positive are not classes" in msg
    assert "the data's classes: pos, positive" in msg and "3 classes (0 pos, 1 neu, 2 neg)" in msg
    assert "classes list" in msg


def test_classes_list_of_another_length_lists_both_sides(tmp_path):
    ds = load_source({**_folders(tmp_path / "imgs", ["a", "b"]), "classes": ["a", "b"]}, GREY)
    with pytest.raises(DataError, match=r"classes list has 2 names \(a, b\).*3 classes \(0 pos"):
        align_labels(ds, 3, MODEL_NAMES)


def test_integer_labels_outside_the_classes_list_both_sides():
    ds = TensorDictDataset({"x": torch.zeros(4, 2)}, torch.tensor([40, 41, 49, 41]))
    with pytest.raises(DataError) as err:
        align_labels(ds, 10, None, where="mine.csv")
    msg = str(err.value)
    assert msg.startswith("mine.csv: label(s) 40, 41, 49 lie outside the model's classes [0, 10)")
    assert "the labels found: 40, 41, 49" in msg and "10 classes (indices 0 to 9" in msg
    ok = TensorDictDataset({"x": torch.zeros(3, 2)}, torch.tensor([0, 2, 1]))
    assert align_labels(ok, 3, MODEL_NAMES) is None and ok.labels.tolist() == [0, 2, 1]
    with pytest.raises(DataError, match=r"label\(s\) 3 .*3 classes \(0 pos, 1 neu, 2 neg\)"):
        align_labels(TensorDictDataset({"x": torch.zeros(2, 2)}, torch.tensor([3, 0])), 3,
                     MODEL_NAMES)


def test_unlabelled_rows_need_nothing():
    ds = TensorDictDataset({"x": torch.zeros(2, 2)})
    assert align_labels(ds, 3, MODEL_NAMES) is None and ds.labels is None
