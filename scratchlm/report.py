"""report.html and loss.png: what a run did, in one page that opens without a server."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from scratchlm.config import Recipe, to_toml  # noqa: E402
from scratchlm.train.metrics import read_metrics  # noqa: E402


def loss_figure(rows: list[dict[str, Any]]) -> Figure | None:
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for stage in dict.fromkeys(r["stage"] for r in train):
        pts = [(r["step"], r["loss"]) for r in train if r["stage"] == stage]
        ax.plot(*zip(*pts, strict=True), label=f"{stage} train", linewidth=1)
    for stage in dict.fromkeys(r["stage"] for r in val):
        pts = [(r["step"], r["val_loss"]) for r in val if r["stage"] == stage]
        ax.plot(*zip(*pts, strict=True), "o-", label=f"{stage} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def _curation_section(run_dir: Path) -> str:
    stats_path = run_dir / "curated" / "stats.json"
    if not stats_path.is_file():
        return ""
    from scratchlm.curate.report import example_rejects, funnel_figure

    stats = json.loads(stats_path.read_text())
    parts = ["<h2>Curation</h2>"]
    parts.append(
        f'<img alt="curation funnel" src="data:image/png;base64,{_png(funnel_figure(stats))}">'
    )
    for step, docs in example_rejects(run_dir / "curated").items():
        if not docs:
            continue
        parts.append(f"<h3>Rejected by {html.escape(step)}</h3><ul>")
        for d in docs:
            text = d.get("text", "")[:300]
            parts.append(
                f"<li><b>{html.escape(str(d.get('reason', '')))}</b> "
                f"<code>{html.escape(str(d.get('id', '')))}</code><br>"
                f"<pre>{html.escape(text)}</pre></li>"
            )
        parts.append("</ul>")
    return "\n".join(parts)


def write_report(recipe: Recipe, run_dir: Path) -> Path:
    rows = read_metrics(run_dir / "metrics.jsonl")
    fig = loss_figure(rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>scratchlm report</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;"
        "padding:0 1em}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}pre{white-space:pre-wrap;background:#f6f6f6;padding:8px}</style>",
        f"</head><body><h1>scratchlm run: {html.escape(run_dir.name)}</h1>",
    ]
    results_path = run_dir / "eval" / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        figures = [("checkpoint", f"{results['stage']} step {results['step']}")]
        if "settings" in results:  # the run's [eval]; other settings' results are not read
            from scratchlm.evaluate.report import describe_settings

            figures.append(("evaluation settings", describe_settings(results["settings"])))
        if "val_loss" in results:  # absent when only benchmark tasks were evaluated
            figures += [
                ("validation loss (nats/token)", f"{results['val_loss']:.4f}"),
                ("validation bits per byte", f"{results['val_bpb']:.4f}"),
            ]
        parts.append("<h2>Final figures</h2>")
        parts.append(_table(figures))
        parts.append("<h2>Samples</h2>")
        for s in results.get("samples", []):
            parts.append(
                f"<pre><b>{html.escape(s['prompt'])}</b>{html.escape(s['completion'])}</pre>"
            )
    if fig is not None:
        png = _png_and_save(fig, run_dir / "loss.png")
        parts.append(f'<h2>Loss</h2><img alt="loss curves" src="data:image/png;base64,{png}">')
    parts.append(_eval_section(run_dir, rows))
    parts.append(_curation_section(run_dir))
    from scratchlm.align.report import alignment_section

    parts.append(alignment_section(run_dir, recipe.align.stages, rows))
    parts.append(f"<h2>Recipe</h2><pre>{html.escape(to_toml(recipe.to_dict()))}</pre>")
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
    return out


def _eval_section(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    from scratchlm.evaluate.report import eval_tables_html, in_loop_figure

    parts = [eval_tables_html(run_dir)]
    fig = in_loop_figure(rows)
    if fig is not None:
        png = _png(fig)
        parts.append(
            f'<h3>Task scores during training</h3><img alt="task scores over steps" '
            f'src="data:image/png;base64,{png}">'
        )
    return "\n".join(p for p in parts if p)


def _png_and_save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=100)
    return _png(fig)
