"""Recipe schema: every problem reported together with its path, before any model is loaded."""

import sys

import pytest
import yaml

from slimformer.errors import ConfigError
from slimformer.recipe import Recipe, load_recipe, parse_recipe


def test_defaults_are_the_quickstart():
    r = parse_recipe({})
    assert r.version == 1 and r.model.source == "zoo" and r.model.name == "vit-fmnist"
    assert [s.type for s in r.stages] == ["evaluate"]


def test_shipped_recipes_validate():
    from pathlib import Path

    for path in (Path(__file__).parents[1] / "recipes").glob("*.yaml"):
        assert isinstance(load_recipe(path), Recipe)


def test_all_problems_reported_with_paths():
    bad = {
        "nmae": "typo",
        "seed": -1,
        "model": {"source": "zoo", "name": "no-such-model", "extra": 1},
        "data": {"batch_size": "big", "eval_limit": 0},
        "stages": [{"type": "evaluate"}, {"type": "evaluate", "latency_repeats": 5000}],
    }
    with pytest.raises(ConfigError) as e:
        parse_recipe(bad)
    p = e.value.problems
    assert len(p) == 7
    text = "\n".join(p)
    assert ("nmae: unknown key; allowed keys: data, max_loss, model, name, output, seed, stages, "
            "version") in text
    assert "seed: Input should be greater than or equal to 0, got -1" in text
    assert ("model.name: unknown zoo model 'no-such-model'; the zoo has: clip-fmnist, dinov2-small, "
            "minilm-l6, minilm-trec, minilm-vader, mpnet-base, smollm2-135m, vit-digits-seq, "
            "vit-fmnist") in text
    assert "model.extra: unknown key; allowed keys: name, source" in text
    assert "data.batch_size: Input should be a valid integer" in text
    assert "data.eval_limit: Input should be greater than or equal to 1, got 0" in text
    assert "stages[1].latency_repeats: Input should be less than or equal to 1000, got 5000" in text


def test_unknown_stage_type_lists_allowed():
    with pytest.raises(ConfigError) as e:
        parse_recipe({"stages": [{"type": "quantise"}]})
    assert "stages[0]" in str(e.value) and "'evaluate'" in str(e.value)


def test_version_mismatch():
    with pytest.raises(ConfigError, match="reads recipe version 1, got 2"):
        parse_recipe({"version": 2})


def test_non_zoo_model_needs_a_dataset():
    with pytest.raises(ConfigError, match="needs data: data.source .* or data.dataset"):
        parse_recipe({"model": {"source": "timm", "name": "vit_tiny_patch16_224"}})
    r = parse_recipe({"model": {"source": "timm", "name": "vit_tiny_patch16_224"},
                      "data": "reviews.csv"})  # the user's own data: a text file
    assert r.data.source.kind == "text" and r.data.source.path == "reviews.csv"


def test_factory_string_form_checked_up_front():
    with pytest.raises(ConfigError, match="package.module:callable"):
        parse_recipe({"model": {"source": "factory", "factory": "nocolon"},
                      "data": {"dataset": "fashion-mnist"}})


def test_validation_loads_no_model_and_no_torch(tmp_path):
    import subprocess

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "stages": [{"type": "evaluate"}]}))
    code = (f"from slimformer.recipe import load_recipe; load_recipe({str(path)!r}); "
            "import sys; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_bare_on_and_off_switches_in_yaml_are_the_words(tmp_path):
    """YAML 1.1 reads ``on`` / ``off`` as booleans; the quantize switches take them as written."""
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nstages:\n  - type: quantize\n    method: minmax\n    smooth: on\n"
                    "    rotate_inputs: on\n    act_dynamic: off\n    rotate: off\n")
    stage = load_recipe(path).stages[0]
    assert (stage.smooth, stage.rotate_inputs, stage.act_dynamic, stage.rotate) == (
        "on", "on", "off", "off")
    with pytest.raises(ConfigError, match="act_dynamic"):  # not a switch there: still refused
        parse_recipe({"stages": [{"type": "quantize", "act_dynamic": True}]})
