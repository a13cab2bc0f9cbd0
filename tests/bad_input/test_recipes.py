"""Bad recipes: bounded, decoded, validated; every problem a ConfigError within a second."""

import time

import pytest
import yaml

from slimformer.errors import ConfigError
from slimformer.recipe import MAX_RECIPE_BYTES, load_recipe, parse_recipe

from .conftest import no_traceback

BOMB = "\n".join(["a: &a [" + ",".join(['"lol"'] * 9) + "]"] +
                 [f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]"
                  for p, c in zip("abcdefgh", "bcdefghi", strict=True)]) + "\n"


def _load(tmp_path, text: str | bytes):
    f = tmp_path / "r.yaml"
    (f.write_bytes if isinstance(text, bytes) else f.write_text)(text)
    t0 = time.perf_counter()
    try:
        load_recipe(f)
    finally:
        assert time.perf_counter() - t0 < 1.0
    raise AssertionError("accepted")


@pytest.mark.parametrize("text, what", [
    (BOMB, "aliases are expanded"),  # also for model spec files: see test_cli_errors
    ("a: " + "[" * 200 + "]" * 200, "nest"),
    (b"name: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 9)"),
    ("name: [unclosed", "not valid YAML"),
    ("- a list\n- not a mapping\n", "must be a mapping"),
    ("model: {name: vit-fmnist}\n", "source is missing; it must be one of: zoo, hf_dir"),
    ("stages: [{type: compress}]\n", "unknown type 'compress'; allowed: 'evaluate'"),
    ("version: 7\n", "reads recipe version 1"),
])
def test_bad_recipe_text(tmp_path, text, what):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert what in str(e.value)
    assert "discriminator" not in str(e.value) and "pydantic" not in str(e.value)


def test_too_large_recipe_refused_before_parsing(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text("name: x\n" + "# padding\n" * (MAX_RECIPE_BYTES // 10 + 10))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="at most 1,000,000 bytes"):
        load_recipe(f)
    assert time.perf_counter() - t0 < 1.0


def test_huge_values_are_shortened_in_errors():
    with pytest.raises(ConfigError) as e:
        parse_recipe({"name": "bad name " * 100_000, "seed": "s" * 1_000_000})
    assert len(str(e.value)) < 1000 and "..." in str(e.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="it is a folder"):
        load_recipe(tmp_path)


def test_cli_validate_reports_them_with_exit_2(tmp_path, cli):
    for text in (BOMB, b"\xff\xfe", "model: {}"):
        f = tmp_path / "r.yaml"
        (f.write_bytes if isinstance(text, bytes) else f.write_text)(text)
        res = cli("validate", f)
        assert res.exit_code == 2, res.output
        no_traceback(res)


def test_factory_recipe_says_it_runs_code(tmp_path, cli):
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({"model": {"source": "factory",
                                           "factory": "slimformer.models.generic:torch_encoder",
                                           "inputs": {"src": {"shape": [1, 8, 64]}}},
                                 "data": {"dataset": "fashion-mnist"},
                                 "output": {"dir": str(tmp_path / "out")}}))
    res = cli("validate", f)
    assert res.exit_code == 0, res.output
    assert "runs code: model.factory 'slimformer.models.generic:torch_encoder'" in res.output
    zoo = tmp_path / "z.yaml"
    zoo.write_text(yaml.safe_dump({"output": {"dir": str(tmp_path / "out")}}))
    assert "runs code" not in cli("validate", zoo).output


@pytest.mark.parametrize("name", [".", "..", "a/b", "../x", ""])
def test_recipe_name_cannot_point_elsewhere(name):
    with pytest.raises(ConfigError, match="name: ") as e:
        parse_recipe({"name": name})
    assert "pattern" not in str(e.value) or name == ""


def test_validate_names_quantize_settings_slow_for_the_export_target(tmp_path, cli):
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({"stages": [{"type": "quantize", "method": "repq",
                                             "softmax": "log_sqrt2"},
                                            {"type": "export", "target": "ort-cpu"}],
                                 "output": {"dir": str(tmp_path / "out")}}))
    res = cli("validate", f)
    assert res.exit_code == 0, res.output
    assert "slow for the export target: stages[0] (quantize) -> stages[1]" in res.output
    assert "log_sqrt2" in res.output
