"""Labels that do not fit the model's classes: exit 2 naming the data's side and the model's."""

import json

import numpy as np
from PIL import Image

from .conftest import no_traceback

FMNIST_SIDE = "10 classes (0 T-shirt/top, 1 Trouser, 2 Pullover"


def _folders(root, names):
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for j in range(2):
            Image.new("L", (28, 28), 20 * c + j).save(root / name / f"{j}.png")
    return json.dumps({"path": str(root), "size": 28, "mean": [0.286], "std": [0.353],
                       "channels": 1})


def test_integer_labels_beyond_the_models_classes(tmp_path, cli):
    path = tmp_path / "rows.npz"
    rng = np.random.default_rng(0)
    np.savez(path, pixel_values=rng.normal(size=(20, 1, 28, 28)).astype(np.float32),
             labels=np.arange(40, 60) % 10 + 40)  # labels 40..49 for a 10-class model
    res = cli("eval", "vit-fmnist", "--data", path, "--repeats", "1")
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "error: DataError:" in out and "lie outside the model's classes [0, 10)" in out
    assert "the labels found: 40, 41, 42" in out and FMNIST_SIDE in out
    no_traceback(res)


def test_class_folders_the_model_does_not_know(tmp_path, cli):
    spec = _folders(tmp_path / "photos", ["bag", "coat", "tshirt"])
    res = cli("eval", "vit-fmnist", "--data", spec, "--repeats", "1")
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "error: DataError:" in out and "class name(s) tshirt are not classes of the model" in out
    assert "the data's classes: bag, coat, tshirt" in out and FMNIST_SIDE in out
    no_traceback(res)


def test_number_folders_beyond_the_models_classes(tmp_path, cli):
    spec = _folders(tmp_path / "photos", ["3", "12"])
    res = cli("eval", "vit-fmnist", "--data", spec, "--repeats", "1")
    assert res.exit_code == 2, res.output
    assert "label(s) 12 lie outside the model's classes [0, 10)" in " ".join(res.output.split())
    no_traceback(res)


def test_classes_list_of_another_length(tmp_path, cli):
    spec = json.loads(_folders(tmp_path / "photos", ["bag", "coat"]))
    res = cli("eval", "vit-fmnist", "--data", json.dumps({**spec, "classes": ["bag", "coat"]}),
              "--repeats", "1")
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "classes list has 2 names (bag, coat)" in out and FMNIST_SIDE in out
    no_traceback(res)
