"""The run's data by role: validation rows for a search are never training rows."""

import torch

from slimformer.data.datasets import seeded_rows
from slimformer.models.loading import load_model, parse_model_arg
from slimformer.models.spec import ZooSpec
from slimformer.stages.context import DataConfig, RunData
from slimformer.stages.taskquality import EVAL_ROWS, TRAIN_ROWS, task_metrics
from tests.data.test_datasets import build_tiny_dinov2


def _rows(ds) -> set[bytes]:
    return {ds.inputs["x"][i].numpy().tobytes() for i in range(len(ds))}


def test_search_validation_rows_come_from_test_rows_the_evaluation_does_not_use():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    data = RunData(lm, DataConfig(eval_limit=200), seed=3)
    val, note = data.validation(100, seed=3)
    assert len(val) == 100 and "does not use" in note and "test split" in note
    ev, train = data.get("eval"), data.get("train")
    assert not _rows(val) & _rows(ev)  # apart from the evaluation rows
    assert not _rows(val) & _rows(train)  # and never training rows
    again, _ = data.validation(100, seed=3)
    assert torch.equal(again.inputs["x"], val.inputs["x"])  # seeded


def test_validation_rows_say_when_they_overlap_the_evaluation():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    val, note = RunData(lm, DataConfig()).validation(300)
    assert len(val) == 300 and "overlap the evaluation rows" in note


def _bert64():
    from slimformer.models.spec import HfConfigSpec

    return load_model(HfConfigSpec(model_type="bert", task="sequence-classification", config={
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "num_labels": 2, "max_position_embeddings": 64}))


def _long_text(tmp_path):
    from slimformer.data.text import minilm_path

    f = tmp_path / "long.txt"
    f.write_text("".join(" ".join(f"word{i}x{j}" for j in range(80)) + "\n" for i in range(8)))
    return {"path": str(f), "tokenizer": str(minilm_path())}


def test_text_max_length_defaults_to_the_model_positions(tmp_path):
    """128 tokens by default, but never beyond the model's 64 positions (was a shape error)."""
    from slimformer.models.evaluate import run_batch

    lm = _bert64()
    ds = RunData(lm, DataConfig(eval=_long_text(tmp_path), calib=_long_text(tmp_path))).get(
        "eval")
    assert ds.inputs["input_ids"].shape == (8, 64)
    assert run_batch(lm.module, ds.inputs).logits.shape == (8, 2)


def test_image_features_default_to_fashion_mnist_through_the_processor(tmp_path):
    lm = load_model(parse_model_arg(str(build_tiny_dinov2(tmp_path)), task="image-features"))
    data = RunData(lm, DataConfig())
    assert data.builtin == "fashion-mnist"
    rows = EVAL_ROWS["image-features"]
    assert data.get("eval").inputs["pixel_values"].shape == (rows, 3, 32, 32)  # processor's crop
    assert any(f"first {rows} rows" in n for n in data.notes)
    bank = data.sample("train", TRAIN_ROWS["image-features"])
    assert bank.inputs["pixel_values"].shape == (TRAIN_ROWS["image-features"], 3, 32, 32)
    res = task_metrics(lm.module, lm.module, "image-features", data, 64)
    assert res["feature_cosine_mean"] > 0.9999 and res["samples"] == rows
    assert res["knn_bank_rows"] == TRAIN_ROWS["image-features"]
    assert res["knn_accuracy"] == res["knn_accuracy_float"] > 0.3  # 10 classes: chance is 0.1
    small = RunData(lm, DataConfig(eval_limit=20))
    assert len(small.get("eval")) == 20 and not small.notes


def test_sample_of_a_plain_split_is_the_seeded_rows():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    data = RunData(lm, DataConfig())
    full, part = data.get("train"), data.sample("train", 50)
    torch.testing.assert_close(part.inputs["x"], full.inputs["x"][seeded_rows(len(full), 50)])


def test_text_of_a_model_without_a_path_uses_its_folders_tokenizer(tmp_path):
    """A real zoo model (a name, no path) tokenizes the user's text with its own folder's
    tokenizer (the folder it was loaded from); before, the text was refused."""
    import dataclasses
    import shutil

    from slimformer.data.text import minilm_path

    lm = _bert64()
    folder = tmp_path / "zoo-folder"
    folder.mkdir()
    for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / n, folder / n)
    zoo = dataclasses.replace(lm, spec=ZooSpec(name="minilm-l6"), folder=folder)
    text = {"path": _long_text(tmp_path)["path"]}  # no tokenizer given
    ds = RunData(zoo, DataConfig(eval=text, calib=text)).get("eval")
    assert ds.inputs["input_ids"].shape == (8, 64)
    assert int(ds.inputs["input_ids"][0, 0]) == 101  # MiniLM's [CLS]
