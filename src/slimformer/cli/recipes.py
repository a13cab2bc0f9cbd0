"""``run`` and ``validate``: a recipe file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimformer.cli.common import _console, _errors, _progress, _say_code


def _default_recipe():
    """The quickstart recipe shipped in the package (``recipes/quickstart.yaml`` in a checkout)."""
    from importlib.resources import as_file, files

    from slimformer.recipe import load_recipe

    with as_file(files("slimformer") / "recipes" / "quickstart.yaml") as path:
        return load_recipe(path)


def run(recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML (default: "
                                                      "recipes/quickstart.yaml).")] = None,
        out: Annotated[Path | None, typer.Option(help="Output folder (overrides recipe).")] = None,
        overwrite: Annotated[bool | None, typer.Option(
            "--overwrite/--no-overwrite", help="Replace an earlier slimformer output (default: "
            "the recipe's output.overwrite).", show_default=False)] = None):
    """Run a recipe; with no argument, the quickstart recipe on the built-in default model."""
    from slimformer.pipeline import run as run_pipeline
    from slimformer.recipe import load_recipe

    con, _ = _console()
    with _errors():
        r = load_recipe(recipe) if recipe else _default_recipe()
        _say_code(con, r)
        with _progress() as prog:
            result = run_pipeline(r, prog, out, overwrite)
    from slimformer.report.render import to_markdown

    con.print(to_markdown(result.report), markup=False, highlight=False)
    con.print(f"report written to {result.out_dir}/report.{{json,md,html}}")


def validate(recipe: Annotated[Path, typer.Argument(help="Recipe YAML to check.")]):
    """Check a recipe without loading any model; lists every problem with its path."""
    from slimformer.recipe import load_recipe
    from slimformer.store.outdir import check_output

    con, _ = _console()
    with _errors():
        r = load_recipe(recipe)
        check_output(r.output_dir(), r.output.overwrite)
    _say_code(con, r)
    con.print(f"{recipe}: valid (version {r.version}, {len(r.stages)} stage(s): "
              f"{', '.join(s.type for s in r.stages) or 'none'}; output {r.output_dir()})")
