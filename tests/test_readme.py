"""Every runnable snippet of README.md runs: bash lines through the CLI, python with the venv's python.

A fenced block is runnable when its language is ``bash``, ``python`` or ``yaml`` (a recipe, checked
with ``slimformer validate``), unless the line before it is ``<!-- not run: reason -->``. All blocks
run in order in one temporary working folder (so one block may use what an earlier one wrote),
holding a link to the repository's ``recipes/`` and the files the README's own-data example names
(``my-bert/``, ``reviews.csv``, ``photos/``).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimformer.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<skip><!-- not run: [^>]+ -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)^```$",
                   re.M | re.S)
RUNNABLE = ("bash", "python", "yaml")


def blocks(text: str) -> list[tuple[str, str, bool]]:
    """(language, body, runnable) of every fenced block in ``text``, in order."""
    return [(m["lang"], m["body"], m["lang"] in RUNNABLE and not m["skip"])
            for m in FENCE.finditer(text)]


def commands(body: str) -> list[list[str]]:
    """The slimformer argument lists of a bash block: one command a line, ``S=...`` set-up skipped.

    Raises:
        ValueError: A line that is not a slimformer command (the README promises each is).
    """
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words or re.fullmatch(r"S=\S*slimformer", " ".join(words)):
            continue
        if words[0] not in ("slimformer", ".venv/bin/slimformer", "$S"):
            raise ValueError(f"not a slimformer command: {line!r}")
        out.append(words[1:])
    return out


def test_blocks_and_commands_are_parsed():
    text = ("x\n```bash\nS=.venv/bin/slimformer\n$S eval m --data '{\"a\": 1}'  # c\n```\n"
            "<!-- not run: slow -->\n```bash\nmake test\n```\n```yaml\nk: 1\n```\n```\nout\n```\n")
    got = blocks(text)
    assert [(lang, run) for lang, _, run in got] == [("bash", True), ("bash", False),
                                                     ("yaml", True), ("", False)]
    assert commands(got[0][1]) == [["eval", "m", "--data", '{"a": 1}']]
    with pytest.raises(ValueError, match="not a slimformer command"):
        commands("rm -rf /\n")


def _own_data(tmp: Path) -> None:
    """The files the README's own-data example names, as a user would have them."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import BertConfig, BertForSequenceClassification

    from slimformer.data.fashion_mnist import load_arrays
    from slimformer.data.text import minilm_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(tmp / "my-bert")
    for f in minilm_path().iterdir():  # a real tokenizer in the folder, as a user's has it
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, tmp / "my-bert" / f.name)
    rows = [("a wonderful, moving film", "pos"), ("dull and far too long", "neg")] * 80
    (tmp / "reviews.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    images, labels = load_arrays("test")
    for i in range(64):  # real Fashion-MNIST images as PNG files in class sub-folders 0/ .. 9/
        d = tmp / "photos" / f"{labels[i]}"  # (names must be the model's: T-shirt/top is no name)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[i], dtype=np.uint8)).save(d / f"{i}.png")


@pytest.mark.slow
def test_readme_snippets_run(tmp_path, monkeypatch):
    runnable = [(lang, body) for lang, body, run in blocks(README.read_text()) if run]
    assert {lang for lang, _ in runnable} == set(RUNNABLE)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    _own_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    took = []
    for n, (lang, body) in enumerate(runnable):
        start = time.perf_counter()
        if lang == "python":
            res = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, f"python block {n}:\n{body}\n{res.stdout}\n{res.stderr}"
            took.append((time.perf_counter() - start, f"python block {n}"))
            continue
        if lang == "yaml":
            recipe = tmp_path / f"block{n}.yaml"
            recipe.write_text(body)
            argv_list = [["validate", str(recipe)]]
        else:
            argv_list = commands(body)
        for argv in argv_list:
            start = time.perf_counter()
            res = runner.invoke(app, argv, prog_name="slimformer")
            assert res.exit_code == 0, f"slimformer {shlex.join(argv)}\n{res.output}"
            took.append((time.perf_counter() - start, f"slimformer {shlex.join(argv)}"[:100]))
    print("\n".join(f"{s:6.1f} s  {what}" for s, what in took))  # shown with pytest -s
    # what the tour promises to leave behind
    assert json.loads((tmp_path / "runs" / "w4a4" / "report.json").read_text())["stages"]


def _cli_options() -> dict[str, set[str]]:
    """Every CLI command path ('export onnx') with the option names it takes."""
    import typer.main

    out = {}

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
            return
        out[" ".join(path)] = {o for p in cmd.params if p.param_type_name == "option"
                               for o in (*p.opts, *p.secondary_opts)}

    walk(typer.main.get_command(app), [])
    return out


def test_cli_reference_names_only_real_commands_and_options():
    """Each row of the README's CLI table: its command exists and takes every option it names."""
    cli = _cli_options()
    rows = [ln for ln in README.read_text().splitlines() if ln.startswith("| `slimformer ")]
    assert len(rows) >= 10
    for row in rows:
        for part in row.split("|")[1].split(" / "):  # `zoo list` / `zoo train NAME ...`
            words = part.strip(" `").removeprefix("slimformer ").split()
            name = next((c for c in sorted(cli, key=len, reverse=True)
                         if words[:len(c.split())] == c.split()), None)
            if name is None and words[0] in ("list", "train"):
                name = f"zoo {words[0]}"
            assert name, f"no such command: {part}"
            for opt in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", part):
                for flag in opt.split("/"):
                    assert flag in cli[name], f"slimformer {name} has no {flag}"
