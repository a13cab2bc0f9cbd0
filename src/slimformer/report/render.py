"""Render a :class:`~slimformer.report.model.Report` as JSON, Markdown and self-contained HTML."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from slimformer.report import summary as S
from slimformer.report.model import Report
from slimformer.store.outdir import staged_dir


def to_json(report: Report) -> str:
    """Pretty JSON."""
    return json.dumps(report.model_dump(mode="json"), indent=2) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def stage_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """One narrow row per stage: #, stage, accuracy (or fidelity), size, latency, seconds."""
    b = S.shown_batch(report)
    q = S.quality_metric(report)
    head = ["#", "stage", "accuracy" if q in (None, "accuracy") else "fidelity", "size",
            f"latency (batch {b})" if b else "latency", "s"]
    rows = []
    for s, lats in zip(report.stages, S.latencies(report), strict=True):
        lat = "; ".join(x.text() for x in lats if x.batch == b)
        rows.append([str(s.index), _stage_label(s), S.quality_text(s), S.size_text(s), lat,
                     f"{s.seconds:.1f}"])
    return head, rows


def _stage_label(s) -> str:
    m = s.metrics
    if s.type == "quantize" and "bits" in m:
        return f"quantize {m['bits']} {m.get('method', '')}".strip()
    if s.type == "export":
        form = m.get("form_target")
        return "export " + ("QDQ " if m.get("quantized") else "float ") + "ONNX" + \
            (f" ({form})" if form else "")
    return s.type


def _scalars(d: dict) -> list[tuple[str, str]]:
    return [(k, _fmt(v)) for k, v in d.items() if not isinstance(v, (list, dict))]


def _note_blocks(notes: list[str]) -> list[tuple[str, list[str]]]:
    """Notes as ``("text", [line])`` and ``("table", [markdown table lines])`` blocks."""
    blocks: list[tuple[str, list[str]]] = []
    for n in notes:
        kind = "table" if n.lstrip().startswith("|") else "text"
        if kind == "table" and blocks and blocks[-1][0] == "table":
            blocks[-1][1].append(n)
        else:
            blocks.append((kind, [n]))
    return blocks


def _lat_rows(s) -> list[list[str]]:
    return [[k, *(_fmt(v.get(c, "")) for c in ("median_ms", "p90_ms"))] for k, v in
            s.latency.items()]


def to_markdown(report: Report) -> str:
    """Markdown: headline, one narrow row per stage, a sub-section of details per stage, context."""
    head, rows = stage_table(report)
    md_row = lambda r: "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"  # noqa: E731
    lines = [f"# slimformer report: {report.name}", "",
             f"**{report.headline or S.headline(report)}**", "",
             f"Created {report.created} by slimformer {report.slimformer_version}; "
             f"total {report.total_seconds:.1f} s.", "", "## Stages", "", md_row(head),
             "|" + "---|" * len(head), *map(md_row, rows)]
    simulated = [x for lats in S.latencies(report) for x in lats if x.simulated]
    if simulated:
        lines += ["", _SIMULATED]
    for s, q in zip(report.stages, S.quantized_at(report), strict=True):
        lines += ["", f"### Stage {s.index}: {_stage_label(s)}", ""]
        lines += [f"- **WARNING**: {w}" for w in s.warnings]
        if s.config:
            lines.append(f"- config: `{json.dumps(s.config, separators=(',', ':'))}`")
        lines += [f"- {k}: {v}" for k, v in _scalars(s.metrics)]
        lines += [f"- size {k}: {v}" for k, v in s.size.items()]
        if s.latency:
            lines += ["", "| latency | median ms | p90 ms |", "|---|---|---|"]
            lines += [md_row(r) for r in _lat_rows(s)]
            if q and any(not k.partition(" ")[2] for k in s.latency):
                lines.append(f"\nPyTorch latency of this quantized model is {_SIM_SHORT}.")
        for kind, block in _note_blocks(s.notes):
            lines += ["", *block, ""] if kind == "table" else [f"- note: {block[0]}"]
        for cap, path in s.images.items():
            lines += ["", f"![{cap}]({path})"]
    lines += ["", "## Model", ""] + [f"- {k}: {v}" for k, v in _scalars(report.model)]
    lines += ["", "## Structure", ""] + [f"- {k}: {v}" for k, v in _scalars(report.structure)]
    lines += ["", "## Data", ""] + [f"- {k}: {v}" for k, v in report.data.items()]
    env = report.environment
    lines += ["", "## Environment", "", f"- python {env.get('python')}, {env.get('platform')}, "
              f"{env.get('cpu_count')} CPUs, torch threads {env.get('torch_threads')}"]
    pk = env.get("packages", {})
    lines.append("- " + ", ".join(f"{k} {v}" for k, v in pk.items() if v))
    lines.append(f"- seeds: {report.seeds}")
    return "\n".join(lines) + "\n"


_SIM_SHORT = "fake-quant simulation in PyTorch, not a deployed speed"
_SIMULATED = (f"Latency marked (simulated) is {_SIM_SHORT}: the export stage's ONNX Runtime / "
              "OpenVINO latency is the deployed one.")
STAGE_COLOURS = {"evaluate": "#4c72b0", "quantize": "#dd8452", "prune": "#55a868",
                 "search": "#c44e52", "export": "#8172b3", "hls": "#937860", "qat": "#da8bc3"}
_MARKERS = {"PyTorch": "o", "ONNX Runtime": "s", "OpenVINO": "^"}
_BASELINE = "#b0b0b0"  # the float file timed beside an exported compressed one
_QUALITY_LABEL = {"accuracy": "accuracy", "output_sqnr_db_min": "output SQNR vs float (dB)",
                  "agreement_with_float": "agreement with float", "agreement": "agreement"}


def plot_png(report: Report) -> bytes:
    """:func:`figure` as PNG bytes (100 dpi)."""
    buf = io.BytesIO()
    figure(report).savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def figure(report: Report):
    """Accuracy (or output SQNR) vs size and vs latency per stage, zoomed y axis.

    Colours are fixed per stage type (:data:`STAGE_COLOURS`), markers per runtime; hollow
    markers are PyTorch latencies of quantized models (simulated). Uses matplotlib's
    object-oriented API with the Agg canvas, so no process-wide backend is set.

    Returns:
        A ``matplotlib.figure.Figure`` with two axes (vs size, vs latency) sharing y.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    q = S.quality_metric(report)
    b = S.shown_batch(report)
    # a float baseline timed beside a compressed file ("ONNX Runtime float": the input model
    # exported the same way) has the input model's quality: the last one measured before the
    # first compressing stage
    base_y = next((s.metrics[q] for s in reversed(report.stages[:S.first_compressing(report)])
                   if q and S.finite(s.metrics.get(q))), None)
    sizes = [s.size["bytes"] for s in report.stages if s.size.get("bytes")]
    unit, scale = ("MB", 1e6) if max(sizes, default=0) >= 1e6 else ("kB", 1e3)
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    ys, types = [], set()
    for s, lats in zip(report.stages, S.latencies(report), strict=True):
        y = s.metrics.get(q) if q else None
        if not S.finite(y):
            continue
        c, label = STAGE_COLOURS.get(s.type, "#7f7f7f"), f"{s.index}:{s.type}"
        types.add(s.type)
        ys.append(y)
        if s.size.get("bytes"):
            ax1.scatter([s.size["bytes"] / scale], [y], color=c, s=60, zorder=3,
                        marker="s" if s.type == "export" else "o")
            ax1.annotate(label, (s.size["bytes"] / scale, y), textcoords="offset points",
                         xytext=(6, 4 - 16 * (s.index % 2)), fontsize=8)
        here = [x for x in lats if x.batch == b and S.finite(x.median_ms)]
        for j, x in enumerate(here):
            baseline = x.runtime.endswith(" float")
            if baseline and not S.finite(base_y):
                continue
            xy = (x.median_ms, base_y if baseline else y)
            ax2.scatter(*([v] for v in xy), s=60, zorder=3,
                        marker=_MARKERS.get(x.runtime.removesuffix(" float"), "D"),
                        facecolors="none" if x.simulated else (_BASELINE if baseline else c),
                        edgecolors=_BASELINE if baseline else c)
            text = (f"{s.index}: float" if baseline else label) + (" sim." if x.simulated else "")
            ax2.annotate(text, xy, textcoords="offset points", xytext=(6, 4 - 11 * (j % 3)),
                         fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        xs = [o.get_offsets()[0][0] for o in ax.collections]
        if xs and max(xs) / max(min(xs), 1e-12) > 8:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if not xs:
            ax.text(0.5, 0.5, "nothing measured", ha="center", va="center",
                    transform=ax.transAxes)
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max(0.25 * (hi - lo), 0.005 if q != "output_sqnr_db_min" else 0.5)
        ax1.set_ylim(lo - pad, hi + pad)
    ax1.set_ylabel(_QUALITY_LABEL.get(q, "accuracy") + " (zoomed)")
    ax1.set_xlabel(f"size ({unit}; export: ONNX file)")
    ax2.set_xlabel(f"median latency at batch {b} (ms)" if b else "latency (ms)")
    ax1.set_title("accuracy vs size" if q in (None, "accuracy") else "fidelity vs size")
    ax2.set_title("accuracy vs latency" if q in (None, "accuracy") else "fidelity vs latency")
    handles = [Line2D([], [], ls="", marker="o", color=STAGE_COLOURS.get(t, "#7f7f7f"), label=t)
               for t in STAGE_COLOURS if t in types]
    if handles:
        ax1.legend(handles=handles, fontsize=8, title="stage", title_fontsize=8)
    runtimes = sorted({o.runtime.removesuffix(" float") for lats in S.latencies(report)
                       for o in lats})
    simulated = any(o.simulated for lats in S.latencies(report) for o in lats)
    rt = [Line2D([], [], ls="", marker=_MARKERS.get(r, "D"), color="#555", label=r)
          for r in runtimes]
    if any(o.runtime.endswith(" float") for lats in S.latencies(report) for o in lats):
        rt.append(Line2D([], [], ls="", marker="s", color=_BASELINE,
                         label="float model, timed beside it"))
    if simulated:
        rt.append(Line2D([], [], ls="", marker="o", color="#555", markerfacecolor="none",
                         label="PyTorch, quantized (simulated)"))
    if rt:
        ax2.legend(handles=rt, fontsize=8, title="runtime", title_fontsize=8)
    fig.tight_layout()
    return fig


def stage_images(report: Report, base: Path | None) -> list[tuple[str, bytes | None, str]]:
    """``(caption, PNG bytes or None, path)`` of every stage image, read below ``base``.

    A path that is absolute, leaves ``base`` or is missing gives ``None`` (the HTML says so).
    """
    out = []
    for s in report.stages:
        for cap, rel in s.images.items():
            data = None
            if base is not None and not Path(rel).is_absolute():
                p = (Path(base) / rel).resolve()
                if p.is_relative_to(Path(base).resolve()) and p.is_file():
                    data = p.read_bytes()
            out.append((f"stage {s.index} ({s.type}): {cap}", data, rel))
    return out


def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" style="max-width:100%" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')


def to_html(report: Report, base: str | Path | None = None) -> str:
    """Self-contained HTML: headline, narrow stage table, plots, collapsible details per stage.

    Images of stages (e.g. the search front) are read from ``base`` (the run folder) and
    embedded as base64; nothing refers to an external file.
    """
    esc = html.escape
    head, rows = stage_table(report)

    def table(h, rs):
        th = "".join(f"<th>{esc(x)}</th>" for x in h)
        trs = "".join("<tr>" + "".join(f"<td>{esc(str(x))}</td>" for x in r) + "</tr>"
                      for r in rs)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    def md_table(lines):
        cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines
                 if not set(ln.strip()) <= set("|-: ")]
        return table(cells[0], cells[1:]) if cells else ""

    kv = lambda d: table(["key", "value"], _scalars(d))  # noqa: E731
    images = stage_images(report, Path(base) if base is not None else None)
    plots = [_img(plot_png(report), "accuracy vs size and vs latency per stage")]
    for cap, png, rel in images:
        plots.append(f"<figure>{_img(png, cap)}<figcaption>{esc(cap)}</figcaption></figure>"
                     if png else f"<p>{esc(cap)}: image {esc(rel)} not found</p>")
    details = []
    for s, q in zip(report.stages, S.quantized_at(report), strict=True):
        body = [f"<p><b>WARNING</b>: {esc(w)}</p>" for w in s.warnings]
        body.append(f"<h4>metrics</h4>{kv(s.metrics)}" if s.metrics else "")
        if s.latency:
            body.append("<h4>latency</h4>" + table(["latency", "median ms", "p90 ms"],
                                                   _lat_rows(s)))
            if q and any(not k.partition(" ")[2] for k in s.latency):
                body.append(f"<p>PyTorch latency of this quantized model is {_SIM_SHORT}.</p>")
        if s.size:
            body.append(f"<h4>size</h4>{kv(s.size)}")
        for kind, block in _note_blocks(s.notes):
            body.append(md_table(block) if kind == "table" else f"<p>{esc(block[0])}</p>")
        body.append(f"<h4>config</h4><pre>{esc(json.dumps(s.config, indent=1))}</pre>")
        details.append(f"<details><summary>Stage {s.index}: {esc(_stage_label(s))} "
                       f"({len(s.metrics)} metrics, {len(s.notes)} notes)</summary>"
                       + "".join(body) + "</details>")
    simulated = any(x.simulated for lats in S.latencies(report) for x in lats)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>slimformer report: {esc(report.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1150px}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px}}
th{{background:#f0f0f0}}.headline{{font-size:1.3em;font-weight:bold;padding:.5em;
background:#eef4ff;border-left:4px solid #4c72b0}}details{{margin:.4em 0}}
summary{{cursor:pointer;font-weight:bold}}pre{{background:#f7f7f7;padding:.5em;overflow:auto}}
</style></head><body>
<h1>slimformer report: {esc(report.name)}</h1>
<p class="headline" id="headline">{esc(report.headline or S.headline(report))}</p>
<p>Created {esc(report.created)} by slimformer {esc(report.slimformer_version)};
total {report.total_seconds:.1f} s.</p>
<h2>Stages</h2>{table(head, rows)}
{f"<p>{esc(_SIMULATED)}</p>" if simulated else ""}
<h2>Plots</h2>{"".join(plots)}
<h2>Stage details</h2>{"".join(details)}
<details><summary>Model, structure, data</summary><h3>Model</h3>{kv(report.model)}
<h3>Structure</h3>{kv(report.structure)}<h3>Data</h3>{kv(report.data)}</details>
<details><summary>Environment</summary>{kv(report.environment)}
{kv(report.environment.get("packages", {}))}<p>seeds: {esc(str(report.seeds))}</p></details>
</body></html>
"""


def write_report(report: Report, out_dir: str | Path, extra: dict[str, bytes] | None = None) -> Path:
    """Write ``report.json``, ``report.md``, ``report.html`` (+ ``extra`` files) all-or-nothing.

    The files are rendered into a staging folder that replaces ``out_dir`` only when all of them
    are written (and only if ``out_dir`` is new, empty or an earlier slimformer output: see
    :func:`~slimformer.store.outdir.staged_dir`).
    """
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        write_report_files(report, tmp, extra)
    return out_dir


def write_report_files(report: Report, folder: Path, extra: dict[str, bytes] | None = None) -> None:
    """Write ``extra`` files and the report files into an existing ``folder``.

    ``extra``: ``{relative path: bytes}`` (e.g. ``search/front.png``), written first so that the
    HTML can embed the images among them; the model files (which may hold images too) are the
    pipeline's to write before this.
    """
    for name, data in (extra or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "report.json").write_text(to_json(report), encoding="utf-8")
    (folder / "report.md").write_text(to_markdown(report), encoding="utf-8")
    (folder / "report.html").write_text(to_html(report, folder), encoding="utf-8")
