"""The run's data by role: validation rows for a search are never training rows."""

import torch

from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.stages.context import DataConfig, RunData


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
