"""The report's evaluation section: task scores of each evaluated checkpoint, with the chance
level beside each, and the in-loop task scores over training steps."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

SKIPPED = ("n", "chance", "shots", "seconds", "max_gen_toks")


def evaluated_checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    """RUN/eval/<stage>-<step>.json files that hold task scores, oldest step first: those of the
    run's own [eval] settings, not those of an evaluation with other settings (--limit 50...)."""
    folder = run_dir / "eval"
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.json"):
        if path.name == "results.json":
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (data.get("tasks") or data.get("harness")) and not data.get("settings_key"):
            found.append(data)
    return sorted(found, key=lambda d: (d.get("step", 0), d.get("stage", "")))


def describe_settings(settings: dict[str, Any]) -> str:
    """'limit 200, data_dir data/eval': the settings the scores were computed under."""
    shown = {"shots": "task defaults", "data": None}
    parts = []
    for name, value in settings.items():
        if value is None or value is False:
            value = shown.get(name, value)
        if name == "limit" and value == 0:
            value = "all"
        if value is not None and value is not False:
            parts.append(f"{name} {'on' if value is True else value}")
    return ", ".join(parts)


def _fmt(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return ""
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def score_rows(scores: dict[str, dict[str, Any]]) -> list[list[str]]:
    """[task, metric, value ± stderr, chance, n] for each reported metric."""
    rows = []
    for task, values in scores.items():
        for name, value in values.items():
            if name in SKIPPED or name.endswith("_stderr") or not isinstance(value, float):
                continue
            error = values.get(f"{name}_stderr")
            shown = _fmt(value) + (f" ± {_fmt(error)}" if isinstance(error, float) else "")
            chance = values.get("chance") if name.startswith(("acc", "exact_match")) else None
            rows.append([task, name, shown, _fmt(chance), str(values.get("n", ""))])
    return rows


def eval_tables_html(run_dir: Path) -> str:
    parts = []
    for data in evaluated_checkpoints(run_dir):
        for key, source in (("tasks", "scratchlm"), ("harness", "lm-evaluation-harness")):
            if not data.get(key):
                continue
            head = "".join(f"<th>{h}</th>" for h in ["task", "metric", "score", "chance", "n"])
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in score_rows(data[key])
            )
            title = f"{data.get('stage', '?')} step {data.get('step', '?')} ({source}"
            title += f"; {describe_settings(data['settings'])})" if "settings" in data else ")"
            parts.append(f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table>")
    if not parts:
        return ""
    return "<h2>Benchmarks</h2>\n" + "\n".join(parts)


def in_loop_figure(rows: list[dict[str, Any]]) -> Figure | None:
    """eval/<task>/<metric> values logged during training, one line per task and metric."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("eval/") and isinstance(value, (int, float)):
                series.setdefault((row.get("stage", ""), key[5:]), []).append((row["step"], value))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (stage, name), points in series.items():
        ax.plot(*zip(*sorted(points), strict=True), "o-", label=f"{stage} {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
