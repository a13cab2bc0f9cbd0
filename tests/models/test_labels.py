"""The model's classes (score width, id2label, zoo names) and the labels of a run's data."""

import shutil

import pytest
import torch
from PIL import Image

from slimformer.data.text import minilm_path
from slimformer.errors import DataError
from slimformer.models.labels import check_labels, config_names, model_classes
from slimformer.models.loading import LoadedModel, load_model
from slimformer.models.spec import HfDirSpec, InputSpec, ZooSpec
from slimformer.stages.context import DataConfig, RunData

NAMES = {0: "pos", 1: "neu", 2: "neg"}


def _bert_dir(tmp_path, id2label=None):
    """A tiny 3-class BertForSequenceClassification folder with the MiniLM tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path / "bert"
    torch.manual_seed(0)
    kw = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label \
        else {"num_labels": 3}
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, **kw)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    for f in minilm_path().iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


def _csv(tmp_path, labels):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"sentence {i},{y}\n" for i, y in enumerate(labels)))
    return path


def test_text_labels_follow_the_models_id2label(tmp_path):
    lm = load_model(HfDirSpec(path=str(_bert_dir(tmp_path, NAMES))))
    labels = ["pos", "neu", "neg"] * 4
    data = RunData(lm, DataConfig(source={"path": str(_csv(tmp_path, labels)), "max_length": 8},
                                  calib_rows=3))
    ev, cal = data.get("eval"), data.get("calib")
    for ds in (ev, cal):  # every row of both roles scored against its own class
        texts = [int(t) for t in _row_numbers(ds)]
        assert ds.labels.tolist() == [{"pos": 0, "neu": 1, "neg": 2}[labels[i]] for i in texts]
        assert ds.classes == ("pos", "neu", "neg")
    assert len(ev) + len(cal) == 12 and data.notes == []


def _row_numbers(ds):
    """The ``i`` of each row's ``sentence i`` (read back through the tokenizer)."""
    from slimformer.data.tabular import load_tokenizer

    tok = load_tokenizer(minilm_path())
    return [tok.decode(ids, skip_special_tokens=True).split()[-1] for ids in ds.inputs["input_ids"]]


def test_model_without_names_gets_a_note_and_alphabetical_order(tmp_path):
    lm = load_model(HfDirSpec(path=str(_bert_dir(tmp_path))))
    assert config_names(lm.module) is None  # LABEL_0, LABEL_1, LABEL_2 are no names
    data = RunData(lm, DataConfig(source=str(_csv(tmp_path, ["pos", "neu", "neg"] * 2)),
                                  calib_rows=2))
    data.get("eval")
    data.get("calib")
    assert len(data.notes) == 1 and "numbered alphabetically (0 neg, 1 neu, 2 pos)" in \
        data.notes[0]


def test_integer_labels_beyond_the_models_classes(tmp_path):
    lm = load_model(HfDirSpec(path=str(_bert_dir(tmp_path, NAMES))))
    data = RunData(lm, DataConfig(source=str(_csv(tmp_path, list(range(10)))), calib_rows=2))
    with pytest.raises(DataError) as err:
        data.get("eval")
    msg = str(err.value)
    assert "lie outside the model's classes [0, 3)" in msg and "3 classes (0 pos, 1 neu, 2 neg)" \
        in msg and "the labels found: " in msg


def test_zoo_model_names_and_builtin_labels():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    out = lm.module(**lm.example_inputs(2))
    classes = model_classes(lm.module, out, lm.dataset)
    assert classes.count == 10 and classes.names == tuple(str(i) for i in range(10))
    ds = RunData(lm, DataConfig(eval_limit=50)).get("eval")  # built-in labels: in range
    assert ds.labels.max() < 10


class _TinyImageClassifier(torch.nn.Module):
    """Scores of 3 classes from the mean brightness of a (B, 1, 4, 4) image, with id2label."""

    def __init__(self, id2label):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(id2label=id2label)
        self.head = torch.nn.Linear(1, 3)

    def forward(self, pixel_values):
        return self.head(pixel_values.mean((1, 2, 3))[:, None])


def test_image_folders_follow_the_models_names_and_unknown_ones_fail(tmp_path):
    model = _TinyImageClassifier({0: "T-shirt", 1: "Bag", 2: "Coat"})
    lm = LoadedModel(model, None, {"pixel_values": InputSpec(shape=[1, 1, 4, 4])})
    root = tmp_path / "imgs"
    for c, name in enumerate(["bag", "coat", "t-shirt"]):
        (root / name).mkdir(parents=True)
        for j in range(3):
            Image.new("L", (4, 4), 10 * c + j).save(root / name / f"{j}.png")
    spec = {"path": str(root), "size": 4, "mean": [0.0], "std": [1 / 255]}
    ds = RunData(lm, DataConfig(eval=spec, calib=spec)).get("eval")
    folder = [["bag", "coat", "t-shirt"][int(v) // 10] for v in ds.inputs["pixel_values"][:, 0, 0, 0]]
    assert [("t-shirt", "bag", "coat")[y] for y in ds.labels.tolist()] == folder
    (root / "tshirt").mkdir()
    Image.new("L", (4, 4), 0).save(root / "tshirt" / "0.png")
    with pytest.raises(DataError, match=r"class name\(s\) tshirt are not classes of the model; "
                                        r"the data's classes: bag, coat, t-shirt, tshirt; the model "
                                        r"has 3 classes \(0 T-shirt, 1 Bag, 2 Coat\)"):
        RunData(lm, DataConfig(eval=spec, calib=spec)).get("eval")


def test_models_without_class_scores_for_the_labels_are_left_alone():
    encoder = torch.nn.Linear(4, 4)  # (B, 4) outputs, but labels of another shape

    from slimformer.data.datasets import TensorDictDataset

    ds = TensorDictDataset({"input": torch.zeros(2, 4)}, torch.tensor([[7], [9]]))
    assert check_labels(encoder, ds) is None and ds.labels.tolist() == [[7], [9]]
