"""Render a :class:`~slimformer.report.model.Report` as JSON, Markdown and self-contained HTML."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from slimformer.report.io import atomic_dir
from slimformer.report.model import Report


def to_json(report: Report) -> str:
    """Pretty JSON."""
    return json.dumps(report.model_dump(mode="json"), indent=2) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _stage_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    keys: list[str] = []
    for s in report.stages:
        keys += [k for k in s.metrics if k not in keys and not isinstance(s.metrics[k], dict)]
    lat = sorted({b for s in report.stages for b in s.latency}, key=lambda b: int(b.split("=")[1]))
    head = ["#", "stage", *keys, *(f"latency {b} (ms)" for b in lat), "params", "bytes", "s"]
    rows = []
    for s in report.stages:
        rows.append([str(s.index), s.type, *(_fmt(s.metrics.get(k, "")) for k in keys),
                     *(_fmt(s.latency[b]["median_ms"]) if b in s.latency else "" for b in lat),
                     str(s.size.get("params", "")), str(s.size.get("bytes", "")),
                     f"{s.seconds:.1f}"])
    return head, rows


def to_markdown(report: Report) -> str:
    """Markdown summary: model, structure counts, one row per stage, notes, environment."""
    head, rows = _stage_rows(report)
    lines = [f"# slimformer report: {report.name}", "",
             f"Created {report.created} by slimformer {report.slimformer_version}; "
             f"total {report.total_seconds:.1f} s.", "", "## Model", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in report.model.items() if not isinstance(v, dict)]
    lines += ["", "## Structure", ""]
    lines += [f"- {k}: {v}" for k, v in report.structure.items() if not isinstance(v, (list, dict))]
    lines += ["", "## Data", ""] + [f"- {k}: {v}" for k, v in report.data.items()]
    lines += ["", "## Stages", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    notes = [(s.index, n) for s in report.stages for n in s.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- stage {i}: {n}" for i, n in notes]
    env = report.environment
    lines += ["", "## Environment", "", f"- python {env.get('python')}, {env.get('platform')}, "
              f"{env.get('cpu_count')} CPUs, torch threads {env.get('torch_threads')}"]
    pk = env.get("packages", {})
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in pk.items() if v))
    lines.append(f"- seeds: {report.seeds}")
    return "\n".join(lines) + "\n"


def plot_png(report: Report) -> bytes:
    """One figure: metric per stage and median latency per batch size per stage (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [f"{s.index}:{s.type}" for s in report.stages]
    metric = [s.metrics.get("accuracy", float("nan")) for s in report.stages]
    ax1.bar(labels, metric, color="#4c72b0")
    ax1.set_ylabel("accuracy")
    ax1.set_ylim(0, 1)
    ax1.set_title("metric per stage")
    batches = sorted({b for s in report.stages for b in s.latency},
                     key=lambda b: int(b.split("=")[1]))
    width = 0.8 / max(1, len(batches))
    for j, b in enumerate(batches):
        vals = [s.latency.get(b, {}).get("median_ms", 0.0) for s in report.stages]
        ax2.bar([i + j * width for i in range(len(labels))], vals, width, label=b)
    ax2.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(labels))], labels)
    ax2.set_ylabel("median latency (ms)")
    ax2.set_title("latency per stage")
    if batches:
        ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def to_html(report: Report) -> str:
    """Self-contained HTML: the Markdown content as tables plus the plot embedded as base64."""
    head, rows = _stage_rows(report)
    png = base64.b64encode(plot_png(report)).decode()
    esc = html.escape

    def table(h, rs):
        th = "".join(f"<th>{esc(x)}</th>" for x in h)
        trs = "".join("<tr>" + "".join(f"<td>{esc(x)}</td>" for x in r) + "</tr>" for r in rs)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    kv = lambda d: table(["key", "value"], [[k, _fmt(v)] for k, v in d.items()  # noqa: E731
                                             if not isinstance(v, (list, dict))])
    notes = "".join(f"<li>stage {s.index}: {esc(n)}</li>" for s in report.stages for n in s.notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>slimformer report: {esc(report.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px}}
th{{background:#f0f0f0}}</style></head><body>
<h1>slimformer report: {esc(report.name)}</h1>
<p>Created {esc(report.created)} by slimformer {esc(report.slimformer_version)};
total {report.total_seconds:.1f} s.</p>
<h2>Stages</h2>{table(head, rows)}
<img alt="metric and latency per stage" src="data:image/png;base64,{png}">
<h2>Model</h2>{kv(report.model)}<h2>Structure</h2>{kv(report.structure)}
<h2>Data</h2>{kv(report.data)}
{"<h2>Notes</h2><ul>" + notes + "</ul>" if notes else ""}
<h2>Environment</h2>{kv(report.environment)}{kv(report.environment.get("packages", {}))}
</body></html>
"""


def write_report(report: Report, out_dir: str | Path, extra: dict[str, bytes] | None = None,
                 artifacts: dict | None = None) -> Path:
    """Write ``report.json``, ``report.md``, ``report.html`` (+ ``extra`` files) all-or-nothing.

    The files are rendered into a staging folder that replaces ``out_dir`` only when all of them
    are written (and only if ``out_dir`` is new, empty or an earlier slimformer output: see
    :func:`~slimformer.report.outdir.staged_dir`). ``artifacts`` maps a sub-folder name to a
    writer ``f(path)`` (e.g. the quantized model), written in the same way.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_report_files(report, tmp, extra, artifacts)
    return out_dir


def write_report_files(report: Report, folder: Path, extra: dict[str, bytes] | None = None,
                       artifacts: dict | None = None) -> None:
    """Write the report files, ``extra`` files and ``artifacts`` into an existing ``folder``."""
    (folder / "report.json").write_text(to_json(report), encoding="utf-8")
    (folder / "report.md").write_text(to_markdown(report), encoding="utf-8")
    (folder / "report.html").write_text(to_html(report), encoding="utf-8")
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    for name, writer in (artifacts or {}).items():
        writer(folder / name)
