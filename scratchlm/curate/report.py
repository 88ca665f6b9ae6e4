"""The curation funnel for report.html: a bar per step, and example rejects per step."""

from __future__ import annotations

from pathlib import Path

from scratchlm.documents import read_documents


def funnel_figure(stats: dict):
    """A matplotlib Figure: per step, documents kept (blue) and removed (red), top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = stats["steps"]
    names = [s["step"] for s in steps]
    kept = [s["docs_out"] for s in steps]
    removed = [s["docs_removed"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(steps) + 1.2))
    y = list(range(len(steps)))
    ax.barh(y, kept, color="#4c72b0", label="kept")
    ax.barh(y, removed, left=kept, color="#c44e52", label="removed")
    for i, (k, r) in enumerate(zip(kept, removed, strict=True)):
        ax.text(k + r, i, f" {k:,} kept, {r:,} removed", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("documents")
    ax.set_xlim(0, max([k + r for k, r in zip(kept, removed, strict=True)] + [1]) * 1.45)
    ax.set_title("Curation funnel")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def example_rejects(out: Path, per_step: int = 3, max_chars: int = 300) -> dict[str, list[dict]]:
    """Up to per_step rejected documents of each step: {"id", "reason", "score", "text"} with the
    text cut to max_chars."""
    examples: dict[str, list[dict]] = {}
    rejected = Path(out) / "rejected"
    if not rejected.is_dir():
        return examples
    for step_dir in sorted(p for p in rejected.iterdir() if p.is_dir()):
        picked: list[dict] = []
        for part in sorted(step_dir.glob("part-*.jsonl.zst")):
            for doc in read_documents(part):
                picked.append(
                    {
                        "id": doc["id"],
                        "reason": doc["reason"],
                        "score": doc["score"],
                        "text": doc["text"][:max_chars],
                    }
                )
                if len(picked) >= per_step:
                    break
            if len(picked) >= per_step:
                break
        if picked:
            examples[step_dir.name] = picked
    return examples
