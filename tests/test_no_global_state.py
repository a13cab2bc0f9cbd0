"""No library call changes process-wide state: torch's global RNG, os.environ, logging levels
and warning filters are the same after each public verb as before it (issue 25)."""

import logging
import os
import warnings

import pytest
import torch


def _snapshot():
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
              if isinstance(lg, logging.Logger)}
    return (torch.random.get_rng_state().clone(), dict(os.environ),
            {**levels, "": logging.root.level}, list(warnings.filters))


def _assert_unchanged(before):
    rng, env, levels, filters = before
    now = _snapshot()
    assert torch.equal(now[0], rng), "torch's global RNG state changed"
    assert now[1] == env, {k for k in set(env) ^ set(now[1])}
    assert {k: v for k, v in now[2].items() if k in levels} == levels  # new loggers aside
    assert now[3] == filters, "warnings.filters changed"


def _tiny():
    from slimformer.models.loading import load_model
    from slimformer.models.spec import ZooSpec

    return load_model(ZooSpec(name="vit-digits-seq"))


def _data(lm, split="calib", rows=64):
    from slimformer.data.datasets import get_dataset

    ds = get_dataset(lm.dataset, split)
    return ds.select(torch.arange(rows))


def _load_model():
    from slimformer.models.loading import load_model
    from slimformer.models.spec import HfConfigSpec

    load_model(HfConfigSpec(model_type="bert", config={
        "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "vocab_size": 50}))
    _tiny()


def _quantize():
    from slimformer.quantize.api import quantize
    from slimformer.quantize.config import QuantConfig

    lm = _tiny()
    quantize(lm.module, QuantConfig(method="minmax", calib_samples=32), _data(lm))


def _prune():
    from slimformer.prune.api import prune
    from slimformer.prune.config import PruneConfig

    lm = _tiny()
    prune(lm.module, PruneConfig(method="magnitude", structures=["mlp"], ratio=0.25,
                                 finetune_steps=2, batch_size=16),
          _data(lm, "train"), _data(lm, "test"), inputs=lm.example_inputs(2))


def _export(tmp_path):
    from slimformer.export.onnx import export_onnx

    lm = _tiny()
    export_onnx(lm.module, tmp_path / "m.onnx", lm.example_inputs(2))


def _pipeline(tmp_path):
    from slimformer.pipeline import run
    from slimformer.recipe import parse_recipe

    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"  # a new output each call
    run(parse_recipe({"model": {"source": "zoo", "name": "vit-digits-seq"},
                      "data": {"eval_limit": 32},
                      "stages": [{"type": "evaluate", "latency_batch_sizes": []}],
                      "output": {"dir": str(out)}}))


def _clip_build():
    from slimformer.models.zoo import ZOO

    ZOO["clip-fmnist"].build()


def _search_imports():
    import importlib
    import sys

    sys.modules.pop("slimformer.nas.study", None)  # importing it installed a warnings filter
    importlib.import_module("slimformer.nas.study")


VERBS = {"load_model": _load_model, "prune": _prune, "export": _export,
         "pipeline": _pipeline, "nas.study import": _search_imports,
         "quantize": _quantize, "zoo build clip-fmnist": _clip_build}


@pytest.mark.parametrize("verb", list(VERBS))
def test_public_verb_leaves_process_state_alone(verb, tmp_path):
    import inspect

    fn = VERBS[verb]

    def call():
        fn(tmp_path) if inspect.signature(fn).parameters else fn()

    call()  # first calls import lazily (torch sets its own cache variables then)
    torch.manual_seed(1234)
    before = _snapshot()
    call()
    _assert_unchanged(before)


def test_seeded_build_is_reproducible_and_independent_of_the_caller_rng():
    from slimformer.models.loading import load_model
    from slimformer.models.spec import HfConfigSpec

    spec = HfConfigSpec(model_type="bert", config={"hidden_size": 16, "num_hidden_layers": 1,
                                                   "num_attention_heads": 2,
                                                   "intermediate_size": 32, "vocab_size": 50})
    torch.manual_seed(1)
    a = load_model(spec).module.state_dict()
    torch.manual_seed(2)
    b = load_model(spec).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clip_build_is_seeded_and_independent_of_the_caller_rng():
    """The two-tower model's projections come from seed 0 whatever the caller's RNG holds."""
    from slimformer.models.zoo import ZOO

    torch.manual_seed(1)
    a = ZOO["clip-fmnist"].build().state_dict()
    torch.manual_seed(2)
    b = ZOO["clip-fmnist"].build().state_dict()
    proj = [k for k in a if not k.startswith(("text_encoder.", "image_encoder."))]
    assert proj and all(torch.equal(a[k], b[k]) for k in proj), proj


def test_prune_leaves_the_models_train_and_eval_modes():
    """prune runs the model in eval mode and gives every module its own mode back."""
    from slimformer.prune.api import prune
    from slimformer.prune.config import PruneConfig

    lm = _tiny()
    lm.module.train()
    first = next(m for m in lm.module.modules() if m is not lm.module)
    first.eval()  # a mixed state: the root trains, one child does not
    modes = [m.training for m in lm.module.modules()]
    res = prune(lm.module, PruneConfig(method="magnitude", structures=["mlp"], ratio=0.25,
                                       finetune_steps=0), inputs=lm.example_inputs(2))
    assert [m.training for m in lm.module.modules()] == modes
    assert not res.model.training  # the pruned copy is handed back ready to evaluate


def test_loading_minilm_keeps_the_transformers_progress_bar_setting():
    from transformers.utils import logging as hf_logging

    from slimformer.models.text import load_minilm

    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        load_minilm()
        assert hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        load_minilm()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
