"""Bad saved artifacts: untrusted factories, custom-code HF dirs, edited/truncated/wrong files.

Each test makes a real folder with the library's own writer, damages it the way a careless or
hostile user would, and checks the loader refuses it with a typed error naming what differs.
"""

import io
import json
import shutil
import sys
import uuid

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset, get_dataset
from slimformer.errors import ModelLoadError
from slimformer.models.loading import load_model
from slimformer.models.spec import FactorySpec, HfDirSpec, InputSpec, ZooSpec
from slimformer.prune.serialize import load_pruned, save_pruned
from slimformer.prune.slicing import SliceSpec, slice_model
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference
from slimformer.quantize.serialize import load_quantized, save_quantized, saved_spec
from slimformer.store.integrity import seal, tensor_manifest

ZOO = ZooSpec(name="vit-digits-seq")


def _x(n=4):
    return get_dataset("digits-seq", "test").inputs["x"][:n]


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    """A real quantized folder (inference form, integer codes) and the model's outputs."""
    lm = load_model(ZOO)
    res = quantize(lm.module, QuantConfig(method="minmax", weight_bits=4, act_bits=8),
                   get_dataset("digits-seq", "calib", limit=64))
    model = to_inference(res.model)
    out = tmp_path_factory.mktemp("q") / "q"
    save_quantized(model, out, ZOO)
    with torch.no_grad():
        ref = model(x=_x())
    return out, ref


@pytest.fixture
def q(qdir, tmp_path):
    """A fresh copy of the quantized folder to damage."""
    dst = tmp_path / "q"
    shutil.copytree(qdir[0], dst)
    return dst


def _reseal(folder, meta_name, tensors_name):
    """Recompute the tensor manifest and hashes: a tool that rewrote the files consistently."""
    meta = json.loads((folder / meta_name).read_text())
    meta["tensors"] = tensor_manifest(folder / tensors_name)
    (folder / meta_name).write_text(json.dumps(seal(meta, folder, [tensors_name])))


def test_intact_folder_loads_to_identical_outputs(qdir):
    again = load_quantized(qdir[0])
    with torch.no_grad():
        assert torch.equal(again(x=_x()), qdir[1])


def _factory_module(tmp_path, monkeypatch):
    """A factory module on sys.path that writes a marker file when it is imported."""
    name = f"sf_marker_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported.marker"
    (tmp_path / f"{name}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "from slimformer.models.generic import torch_encoder as build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = FactorySpec(factory=f"{name}:build", kwargs={"d_model": 32, "nhead": 2,
                                                       "layers": 1, "ffn": 64},
                       inputs={"src": InputSpec(shape=[1, 8, 32])})
    return name, marker, spec


def _forget(name, marker):
    marker.unlink()
    sys.modules.pop(name, None)


def test_factory_in_saved_folders_is_refused_without_trust(tmp_path, monkeypatch):
    name, marker, spec = _factory_module(tmp_path, monkeypatch)
    lm = load_model(spec)  # the user's own model: importing it is what they asked for
    assert marker.is_file()
    data = TensorDictDataset({"src": torch.randn(16, 8, 32)}, torch.zeros(16, dtype=torch.long))
    res = quantize(lm.module, QuantConfig(method="minmax"), data)
    save_quantized(res.model, tmp_path / "q", spec)
    save_pruned(lm.module, tmp_path / "p", spec, SliceSpec({}, {}, {}))
    _forget(name, marker)
    for load, folder, meta in ((load_quantized, "q", "slimformer.json"),
                               (load_pruned, "p", "slimformer.json"),
                               (saved_spec, "q", "slimformer.json")):
        with pytest.raises(ModelLoadError) as e:
            load(tmp_path / folder)
        msg = str(e.value)
        assert meta in msg and f"{name}:build" in msg and "runs code" in msg
        assert "--trust-code" in msg and "trust_code=True" in msg
        assert not marker.exists() and name not in sys.modules  # never imported
    q = load_quantized(tmp_path / "q", trust_code=True)  # trusted: loads, and imports it
    assert marker.is_file()
    with torch.no_grad():
        x = data.inputs["src"][:2]
        assert torch.equal(q(src=x), res.model(src=x))


def _hf_dir(tmp_path, marker):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, vocab_size=100)
    d = tmp_path / "hf"
    BertModel(cfg).save_pretrained(d)
    (d / "custom_bert.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig, BertModel\n"
        "class CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n")
    return d


@pytest.mark.parametrize("model_type", ["bert", "custom-bert"])
def test_hf_dir_with_custom_code_never_runs_it(tmp_path, monkeypatch, model_type):
    from typer.testing import CliRunner

    from slimformer.cli import app

    marker = tmp_path / "ran.marker"
    d = _hf_dir(tmp_path, marker)
    assert load_model(HfDirSpec(path=str(d))).module is not None  # loads without auto_map
    cfg = json.loads((d / "config.json").read_text())
    cfg |= {"model_type": model_type, "auto_map": {"AutoConfig": "custom_bert.CustomConfig",
                                                   "AutoModel": "custom_bert.CustomModel"}}
    (d / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))  # a user who answers yes
    with pytest.raises(ModelLoadError, match="does not run a model directory's own Python"):
        load_model(HfDirSpec(path=str(d)))
    res = CliRunner().invoke(app, ["inspect", str(d)], input="y\ny\n")
    assert res.exit_code == 2 and "auto_map" in res.output, res.output
    assert not marker.exists()


def test_edited_config_is_refused(q):
    meta = json.loads((q / "slimformer.json").read_text())
    meta["stages"][-1]["config"]["weight_bits"] = 8
    (q / "slimformer.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"slimformer.json: section 'stages' was edited"):
        load_quantized(q)


def test_truncated_safetensors_is_refused(q):
    f = q / "quantized.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"quantized.safetensors is [\d,]+ bytes, [\d,]+ "
                                             r"were recorded at save \(truncated or edited\)"):
        load_quantized(q)


def test_flipped_byte_is_refused(q):
    f = q / "quantized.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="content differs from the SHA-256 recorded"):
        load_quantized(q)


@pytest.mark.parametrize("key", ["model.head.bias", "quant.linears.head_weight.int_weight",
                                 "quant.linears.head_weight.wq.scale"])
def test_wrong_shape_tensor_is_refused_even_with_matching_hashes(q, key):
    from safetensors.torch import load_file, save_file

    f = q / "quantized.safetensors"
    state = load_file(str(f))
    state[key] = state[key][:-1].contiguous()  # one output row fewer
    save_file(state, str(f))
    _reseal(q, "slimformer.json", "quantized.safetensors")
    with pytest.raises(ModelLoadError, match=rf"does not fit the rebuilt model .*{key}: "):
        load_quantized(q)


def test_unreadable_manifests_and_headers_are_typed(q):
    f = q / "slimformer.json"
    good = f.read_text()
    f.write_text(good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match="slimformer.json is not valid JSON"):
        load_quantized(q)
    meta = json.loads(good)
    del meta["model_spec"]
    f.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="lacks the key"):
        load_quantized(q)
    f.write_text(json.dumps(json.loads(good) | {"format_version": 1}))
    with pytest.raises(ModelLoadError, match="older slimformer without file hashes"):
        load_quantized(q)
    f.write_text(json.dumps(json.loads(good) | {"kind": "pruned"}))
    with pytest.raises(ModelLoadError, match="holds a pruned artifact, not a quantized one"):
        load_quantized(q)
    f.write_text(json.dumps(json.loads(good) | {"format": "other-tool"}))
    with pytest.raises(ModelLoadError, match="not a slimformer artifact manifest"):
        load_quantized(q)
    f.unlink()
    (q / "quant.json").write_text(good)  # a folder of format version 3 (one manifest per stage)
    with pytest.raises(ModelLoadError, match=r"quant.json was written by an older slimformer"):
        load_quantized(q)
    (q / "quant.json").unlink()
    f.write_bytes(b"\xff\xfe{" + b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="not UTF-8"):
        load_quantized(q)
    f.write_text(good)
    (q / "quantized.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json header")
    meta = json.loads(good)
    (q / "slimformer.json").write_text(json.dumps(seal(meta, q, ["quantized.safetensors"])))
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        load_quantized(q)


def test_pruned_folder_edited_or_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from slimformer.models.structure import discover

    lm = load_model(ZOO)
    x = {"x": _x(2)}
    spec = SliceSpec(heads={0: (0,)}, mlp={1: tuple(range(0, 32, 2))}, dims={})
    small = slice_model(lm.module, discover(lm.module, x), spec, check_inputs=x)
    save_pruned(small, tmp_path / "p", ZOO, spec)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "p").module(x=_x()), small(x=_x()))
    shutil.copytree(tmp_path / "p", tmp_path / "edited")
    meta = json.loads((tmp_path / "edited" / "slimformer.json").read_text())
    meta["slice_spec"]["heads"]["0"] = [1]
    (tmp_path / "edited" / "slimformer.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="section 'slice_spec' was edited"):
        load_pruned(tmp_path / "edited")
    f = tmp_path / "p" / "pruned.safetensors"
    state = load_file(str(f))
    key = "blocks.1.fc1.weight"
    state[key] = torch.cat([state[key], state[key][:1]])  # one MLP unit more than the spec keeps
    save_file(state, str(f))
    _reseal(tmp_path / "p", "slimformer.json", "pruned.safetensors")
    with pytest.raises(ModelLoadError, match=rf"{key}: F32 \[17, 16\] in the file, the rebuilt "
                                             r"model has F32 \[16, 16\]"):
        load_pruned(tmp_path / "p")


def test_search_output_is_checked(tmp_path):
    from slimformer.models.structure import discover
    from slimformer.nas.api import SearchResult
    from slimformer.nas.output import load_chosen, save_search

    lm = load_model(ZOO)
    x = {"x": _x(2)}
    smap = discover(lm.module, x)
    spec = {"heads": {"0": [0]}, "mlp": {"1": list(range(8))}, "dropped_blocks": {}}
    chosen = slice_model(lm.module, smap, SliceSpec.from_dict(spec), check_inputs=x)
    row = {"sub": "s", "phase": "sample", "trial": 1, "accuracy": 0.9, "size": 100.0}
    res = SearchResult(["accuracy", "size"], front=[row], measured=[row],
                       reference=row | {"phase": "reference"}, chosen=row,
                       float_model=chosen, chosen_spec=spec)
    save_search(res, tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(load_chosen(lm.module, smap, tmp_path / "s")(x=_x()), chosen(x=_x()))
    (tmp_path / "s" / "chosen.json").write_text(json.dumps(spec | {"mlp": {"1": [0]}}))
    with pytest.raises(ModelLoadError, match=r"chosen.json is [\d,]+ bytes, [\d,]+ were recorded"):
        load_chosen(lm.module, smap, tmp_path / "s")


def test_nothing_in_src_unpickles():
    """No unpickling and no model code: checked on the AST of every source file.

    torch.load only with weights_only=True; Hugging Face loads only with trust_remote_code=False;
    no pickle, np.load(allow_pickle) or yaml.load.
    """
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src" / "slimformer"
    bad = []
    for f in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            where = f"{f.relative_to(src)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "joblib", "shelve") for n in names):
                    bad.append(f"{where}: imports an unpickler")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            call = ast.unparse(node.func)
            if call == "torch.load" and not (isinstance(kw.get("weights_only"), ast.Constant)
                                             and kw["weights_only"].value is True):
                bad.append(f"{where}: torch.load without weights_only=True")
            pickles = kw.get("allow_pickle")
            if call in ("np.load", "numpy.load") and pickles is not None and not (
                    isinstance(pickles, ast.Constant) and pickles.value is False):
                bad.append(f"{where}: np.load(allow_pickle=...) not False")
            trc = kw.get("trust_remote_code")
            if call.endswith((".from_pretrained", ".from_config")) and not (
                    isinstance(trc, ast.Constant) and trc.value is False):
                bad.append(f"{where}: {call} without trust_remote_code=False")
            if call in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                bad.append(f"{where}: {call} (use yaml.safe_load)")
    assert not bad, bad
