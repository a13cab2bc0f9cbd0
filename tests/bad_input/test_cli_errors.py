"""Bad command-line input: one line, exit 2, no traceback; --debug shows the traceback."""

import pytest

from .conftest import no_traceback


@pytest.mark.parametrize("args, what", [
    (["inspect", "hf:bert", "--config", "{bad"], "--config: not valid JSON"),
    (["inspect", "hf:bert", "--config", "[1, 2]"], "must be a JSON object"),
    (["inspect", "zoo:vit-fmnis"], "unknown zoo model 'vit-fmnis'; the zoo has"),
    (["inspect", "no-such-model"], "is not a zoo model"),
    (["export", "lint", "{garbage}"], "is not a readable ONNX file"),
    (["export", "lint", "{missing}"], "does not exist"),
    (["export", "lint", "{empty}"], "is not an ONNX model"),
    (["run", "{missing}"], "does not exist"),
    (["run", "{garbage}"], "not UTF-8"),
])
def test_typed_error_exit_2(tmp_path, cli, args, what):
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.onnx").write_bytes(b"")
    subst = {"{garbage}": str(garbage), "{missing}": str(tmp_path / "missing.onnx"),
             "{empty}": str(tmp_path / "empty.onnx")}
    args = [subst.get(a, a) for a in args]
    res = cli(*args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and what in res.output, res.output
    no_traceback(res)


def test_model_spec_file_is_bounded_too(tmp_path, cli):
    from .test_recipes import BOMB

    f = tmp_path / "spec.yaml"
    f.write_text(BOMB)
    res = cli("inspect", f)
    assert res.exit_code == 2 and "aliases are expanded" in res.output, res.output
    f.write_bytes(b"source: zoo\nname: caf\xe9\n")
    res = cli("inspect", f)
    assert res.exit_code == 2 and "not UTF-8" in res.output, res.output


def test_debug_shows_the_traceback(tmp_path, cli, monkeypatch):
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"\x00\x01garbage")
    res = cli("--debug", "export", "lint", garbage)
    assert res.exit_code != 2 and res.exception is not None  # re-raised for the bug report
    monkeypatch.setenv("SLIMFORMER_DEBUG", "1")
    res = cli("export", "lint", garbage)
    assert res.exception is not None and "ExportError" in type(res.exception).__name__


def test_library_errors_at_the_boundary_are_exit_2(tmp_path, cli):
    """A library error bad input causes (here: a folder where a file must be) is one line."""
    d = tmp_path / "dir.onnx"
    d.mkdir()
    res = cli("export", "tensorrt", d, "--out", tmp_path / "e.plan")
    assert res.exit_code == 2, res.output
    no_traceback(res)


@pytest.mark.parametrize("args, what", [
    (["eval", "vit-digits-seq", "--batch-size", "0"], "--batch-size: 0 is out of range; allowed: 1 to 4096"),
    (["eval", "vit-digits-seq", "--repeats", "0"], "--repeats: 0 is out of range; allowed: 1 to 1000"),
    (["eval", "vit-digits-seq", "--limit", "-3"], "--limit: -3 is out of range"),
    (["export", "onnx", "vit-digits-seq", "-o", "{tmp}/m.onnx", "--rows", "0"], "--rows: 0 is out"),
    (["export", "openvino", "vit-digits-seq", "-o", "{tmp}/m.xml", "--latency-batch", "0"],
     "--latency-batch: 0 is out of range; allowed: 1 to 1024"),
    (["zoo", "train", "vit-digits-seq", "--out", "{tmp}/z", "--epochs", "0"], "--epochs: 0 is out"),
    (["quantize", "vit-digits-seq", "--out", "{tmp}/q", "--weight-bits", "9"], "weight_bits"),
    (["search", "vit-digits-seq", "--out", "{tmp}/s", "--storage", "x/{0}.journal"],
     "unknown placeholder(s) {0}; the only placeholder is {study}"),
    (["search", "vit-digits-seq", "--out", "{tmp}/s", "--storage", "x/{study.journal"],
     "the only placeholder is {study}"),
])
def test_numeric_and_template_options_are_bounded(tmp_path, cli, args, what):
    """Out-of-range numbers and bad templates: a typed error naming the range, nothing written."""
    res = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code == 2, res.output
    assert "error: ConfigError" in res.output and what in res.output, res.output
    no_traceback(res)
    assert list(tmp_path.iterdir()) == []


def test_model_spec_file_naming_a_factory_says_it_runs_code(tmp_path, cli):
    import yaml

    spec = tmp_path / "m.yaml"
    spec.write_text(yaml.safe_dump({"source": "factory",
                                    "factory": "slimformer.models.generic:torch_encoder",
                                    "inputs": {"src": {"shape": [1, 8, 64]}}}))
    res = cli("inspect", spec, "--json")
    assert res.exit_code == 0, res.output
    said = "runs code: factory 'slimformer.models.generic:torch_encoder' is imported and called"
    assert said in res.stderr and res.stderr.count("runs code") == 1
    assert res.stdout.lstrip().startswith("{")  # the JSON stays clean
    res = cli("inspect", "slimformer.models.generic:torch_encoder", "--config",
              '{"d_model": 64}')
    assert "runs code" not in res.stderr  # named on the command line: no surprise to note
