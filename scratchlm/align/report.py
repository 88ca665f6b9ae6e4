"""The alignment section of report.html: each stage's curves from metrics.jsonl, and the answers
of each generating stage to the same prompts, side by side.

Curves drawn, when the stage logged them: sft loss and val_loss; reward accuracy, val_accuracy
and margin; dpo accuracy, margin and chosen/rejected log-probabilities; ppo and grpo reward and
kl (their rows in metrics.jsonl carry "reward" and "kl").
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scratchlm.align.stage import read_answers  # noqa: E402

# Per stage: panels of (title, [metrics.jsonl keys drawn in it]).
PANELS: dict[str, list[tuple[str, list[str]]]] = {
    "sft": [("SFT loss on assistant tokens", ["loss", "val_loss"])],
    "reward": [
        ("reward model pairwise accuracy", ["accuracy", "val_accuracy"]),
        ("reward model mean margin", ["margin", "val_margin"]),
    ],
    "dpo": [
        ("DPO implicit-reward accuracy", ["accuracy", "val_accuracy"]),
        ("DPO log-probabilities", ["chosen_logps", "rejected_logps"]),
    ],
    "ppo": [("PPO reward", ["reward"]), ("PPO KL to the reference", ["kl"])],
    "grpo": [("GRPO reward", ["reward"]), ("GRPO KL to the reference", ["kl"])],
}


def _figure(rows: list[dict[str, Any]], stage: str) -> str | None:
    from scratchlm.report import _png

    panels = [
        (title, keys)
        for title, keys in PANELS[stage]
        if any(k in r for r in rows if r.get("stage") == stage for k in keys)
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get("stage") == stage and key in r]
            if points:
                ax.plot(
                    *zip(*points, strict=True), "o-" if key.startswith("val_") else "-", label=key
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def _final(rows: list[dict[str, Any]], stage: str) -> list[str]:
    """The stage's last validation figures, as 'key value' strings."""
    last = next((r for r in reversed(rows) if r.get("stage") == stage and "val_loss" in r), None)
    if last is None:
        return []
    return [
        f"{k} {v:.4f}" for k, v in last.items() if k.startswith("val_") and isinstance(v, float)
    ]


def alignment_section(run_dir: Path, stages: list[str], rows: list[dict[str, Any]]) -> str:
    """HTML for the stages of align.stages that left metrics or answers; empty if none did."""
    parts: list[str] = []
    for stage in stages:
        png = _figure(rows, stage) if stage in PANELS else None
        final = _final(rows, stage)
        if png is None and not final:
            continue
        parts.append(f"<h3>{html.escape(stage)}</h3>")
        if final:
            parts.append(f"<p>final validation: {html.escape(', '.join(final))}</p>")
        if png:
            parts.append(f'<img alt="{stage} curves" src="data:image/png;base64,{png}">')
    answered = [s for s in stages if read_answers(run_dir, s)]
    if answered:
        by_stage = {s: read_answers(run_dir, s) for s in answered}
        head = "".join(f"<th>{html.escape(s)}</th>" for s in answered)
        body = []
        for i, row in enumerate(by_stage[answered[0]]):
            cells = "".join(
                f"<td><pre>{html.escape(by_stage[s][i]['answer'])}</pre></td>"
                if i < len(by_stage[s])
                else "<td></td>"
                for s in answered
            )
            body.append(f"<tr><th>{html.escape(row['prompt'])}</th>{cells}</tr>")
        parts.append("<h3>Answers to the same prompts (greedy)</h3>")
        parts.append(f"<table><tr><th>prompt</th>{head}</tr>{''.join(body)}</table>")
    if not parts:
        return ""
    return "<h2>Alignment</h2>\n" + "\n".join(parts)
