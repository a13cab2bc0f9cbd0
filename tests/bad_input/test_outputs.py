"""Bad output paths: nothing slimformer did not write is ever deleted or replaced."""

import json
import os
from pathlib import Path

import pytest
import yaml

from slimformer.errors import OutputError
from slimformer.pipeline import run
from slimformer.recipe import parse_recipe
from slimformer.store.outdir import MARKER, check_output, clean_leftovers, is_output, staged_dir

from .conftest import no_traceback

EVAL = [{"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 1}]


def _recipe(out, **over):
    return parse_recipe({"name": "t", "model": {"source": "zoo", "name": "vit-digits-seq"},
                         "data": {"eval_limit": 40}, "stages": EVAL,
                         "output": {"dir": str(out), **over}})


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def test_foreign_folder_refused_by_every_writing_command(tmp_path, cli):
    mine = _user_folder(tmp_path / "mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"source": "zoo", "name": "vit-digits-seq"},
                                      "stages": EVAL, "output": {"dir": str(mine)}}))
    for args in (["run", recipe], ["quantize", "vit-digits-seq", "--out", mine],
                 ["prune", "vit-digits-seq", "--out", mine], ["search", "vit-digits-seq",
                                                               "--out", mine],
                 ["export", "hls", "vit-digits-seq", "--out", mine],
                 ["run", recipe, "--overwrite"], ["validate", recipe]):
        res = cli(*args)
        assert res.exit_code == 2, (args, res.output)
        assert "not written by slimformer" in res.output, res.output
        no_traceback(res)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "r.yaml"]  # nothing beside


@pytest.mark.parametrize("where", [".", "..", "cwd", "parent", "home", "/"])
def test_protected_paths_always_refused(tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    path = {"cwd": str(work), "parent": str(tmp_path), "home": "~"}.get(where, where)
    path = os.path.expanduser(path)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="refused"):
            check_output(path, overwrite)
    with pytest.raises(OutputError, match="refused"):
        run(_recipe(path, overwrite=True))
    assert list(work.iterdir()) == []


def test_file_at_output_path_refused(tmp_path, cli):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(OutputError, match="is a file"):
        run(_recipe(f, overwrite=True))
    res = cli("quantize", "vit-digits-seq", "--out", f, "--overwrite")
    assert res.exit_code == 2 and "is a file" in res.output
    assert f.read_text() == "keep me"
    onnx = tmp_path / "model.onnx"
    onnx.write_text("not mine")
    res = cli("export", "onnx", "vit-digits-seq", "--out", onnx)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert onnx.read_text() == "not mine"
    res = cli("export", "onnx", "vit-digits-seq", "--out", tmp_path)
    assert res.exit_code == 2 and "is a folder" in res.output


def test_earlier_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "run"
    run(_recipe(out))
    assert is_output(out) and json.loads((out / MARKER).read_text())["state"] == "complete"
    with pytest.raises(OutputError, match="--overwrite"):
        run(_recipe(out))
    (out / "stale.txt").write_text("from the first run")
    res = run(_recipe(out), overwrite=True)
    assert res.out_dir == out and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging, lock or .old


def test_failed_run_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(_recipe(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import slimformer.report.render as render

    def boom(*a, **k):
        raise RuntimeError("disk full while rendering")

    monkeypatch.setattr(render, "write_report_files", boom)
    with pytest.raises(RuntimeError):
        run(_recipe(out, overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_empty_folder_is_used(tmp_path):
    out = tmp_path / "made-for-it"
    out.mkdir()
    run(_recipe(out))
    assert (out / "report.json").is_file()


@pytest.mark.parametrize("template, why", [("runs/{0}", "placeholder {0}"),
                                           ("runs/{nme}", "placeholder {nme}"),
                                           ("runs/{name!r}", "placeholder {name}"),
                                           ("runs/{", "Single '{'"),
                                           ("x" * 5000, "at most 4096")])
def test_output_dir_template_and_length(template, why):
    from slimformer.errors import ConfigError

    with pytest.raises(ConfigError, match="output.dir") as e:
        parse_recipe({"output": {"dir": template}})
    assert why in str(e.value) and len(str(e.value)) < 1000


def test_unwritable_or_impossible_paths(tmp_path):
    f = tmp_path / "plain-file"
    f.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output(f / "sub" / "run")
    with pytest.raises(OutputError, match="cannot write"):
        check_output("/proc/slimformer-test-run")
    with pytest.raises(OutputError, match="too long"):
        check_output(tmp_path / ("n" * 300))
    assert not (tmp_path / "plain-file").is_dir()


def test_symlink_refused(tmp_path):
    target = _user_folder(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        check_output(link, overwrite=True)


def test_leftovers_of_a_killed_run_are_removed_and_an_output_caught_mid_swap_restored(tmp_path):
    out = tmp_path / "run"
    with staged_dir(out) as d:
        (d / "a.txt").write_text("1")
    # what a SIGKILL leaves: a staging folder, and a previous output renamed aside mid-swap
    stale = tmp_path / ".run.x1.tmp"
    stale.mkdir()
    (stale / MARKER).write_text("{}")
    os.replace(out, tmp_path / ".run.x2.old")
    foreign = tmp_path / ".run.mine.tmp"  # not slimformer's: never touched
    _user_folder(foreign)
    notes = clean_leftovers(out)
    assert (out / "a.txt").read_text() == "1" and any("restored" in n for n in notes)
    assert not stale.exists() and (foreign / "thesis.tex").is_file()


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom slimformer.store.outdir import staged_dir\n"
        f"with staged_dir({str(out)!r}):\n    print('in', flush=True)\n    time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "in"
        t0 = time.perf_counter()
        with pytest.raises(OutputError, match="another slimformer process"):
            run(_recipe(out))
        assert time.perf_counter() - t0 < 5  # refused at once, before loading the model
    finally:
        holder.kill()
        holder.wait()
    run(_recipe(out))  # the lock died with its process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unremovable_empty_folder_refused_before_any_stage(tmp_path):
    """An empty output folder that cannot be replaced (immutable) fails before the model loads."""
    import subprocess

    out = tmp_path / "locked"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root on ext4/xfs/btrfs)")
    try:
        with pytest.raises(OutputError, match="cannot be replaced .renaming it failed"):
            with staged_dir(out):
                raise AssertionError("the staging folder must not be reached")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]  # no probe, no lock left
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)


def test_name_leaves_room_for_the_temporary_suffix(tmp_path):
    from slimformer.store.atomic import atomic_path
    from slimformer.store.outdir import MAX_NAME, SUFFIX_ROOM

    ok = tmp_path / ("n" * (MAX_NAME - SUFFIX_ROOM))
    with staged_dir(ok) as tmp:  # the longest allowed name: its staging name fits
        (tmp / "f").write_text("x")
    with atomic_path(ok / ("f" * (MAX_NAME - SUFFIX_ROOM))) as part:
        part.write_text("y")
    for n in (MAX_NAME - SUFFIX_ROOM + 1, 250, MAX_NAME):
        with pytest.raises(OutputError, match="too long"):
            check_output(tmp_path / ("m" * n))
        with pytest.raises(OutputError, match="too long"):
            check_output(tmp_path / ("m" * n), kind="file")


@pytest.mark.parametrize("cmd", [["export", "onnx", "vit-digits-seq"],
                                 ["export", "openvino", "vit-digits-seq"],
                                 ["zoo", "train", "vit-digits-seq"]])
def test_file_output_in_a_missing_folder_creates_no_folders(tmp_path, cli, cmd):
    """A typo in -o must not create a chain of folders: the file's folder must exist."""
    out = tmp_path / "no" / "such" / ("m.xml" if "openvino" in cmd else "m.onnx")
    if cmd[0] == "zoo":
        out = out.parent  # zoo train --out is a folder: it may be new, its parent may not
    res = cli(*cmd, "--out", out)
    assert res.exit_code == 2, res.output
    assert "OutputError" in res.output and "does not exist" in res.output, res.output
    assert list(tmp_path.iterdir()) == []
