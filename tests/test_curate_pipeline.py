import gzip
import json
from pathlib import Path

import pytest
from curate_samples import GOOD_PARAGRAPH, html_page, write_jsonl

from scratchlm.curate.config import CurateConfig
from scratchlm.curate.pipeline import run_curate
from scratchlm.curate.report import example_rejects, funnel_figure
from scratchlm.documents import read_documents
from scratchlm.errors import UserError

C4_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "web" / "c4_demo.jsonl.gz"


def c4_docs(n: int) -> list[str]:
    with gzip.open(C4_SAMPLE, "rt") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f, strict=False)]


def output(out: Path) -> dict[str, str]:
    return {
        d["id"]: d["text"] for p in sorted(out.glob("part-*.jsonl.zst")) for d in read_documents(p)
    }


def rejected(out: Path, step: str) -> list[dict]:
    return [d for p in sorted((out / "rejected" / step).glob("*.zst")) for d in read_documents(p)]


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    docs = c4_docs(12)
    records = [{"id": f"c4-{i}", "text": t} for i, t in enumerate(docs)]
    records += [
        {"id": "exact-copy", "text": "  " + docs[0].lower().replace(" ", "  ")},
        {"id": "near-copy", "text": docs[1] + "\nShare this page with a friend."},
        {
            "id": "german",
            "text": "Der Fluss fließt durch die alte Stadt und an der Mühle vorbei. " * 10,
        },
        {"id": "menu", "text": "\n".join(f"Home | Shop | Item {i}" for i in range(40))},
        {"id": "pii", "text": GOOD_PARAGRAPH + " Write to jane.doe@example.com or visit 8.8.8.8."},
        {"id": "empty", "text": "   "},
        "{broken json",
        {"body": "no text field"},
        {"id": "huge-line", "text": "word " * 2_100_000},
    ]
    write_jsonl(root / "mix.jsonl.gz", records, "gz")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 40)
    truncated = gzip.compress(
        "\n".join(json.dumps({"text": t}) for t in c4_docs(300)[100:]).encode()
    )
    (root / "cut.jsonl.gz").write_bytes(truncated[: len(truncated) // 2])
    (root / "pages").mkdir()
    (root / "pages" / "a.html").write_text(html_page(GOOD_PARAGRAPH))
    (root / "pages" / "empty.html").write_text("<html><body><div></div></body></html>")
    return root


@pytest.fixture(scope="module")
def curated(mixed_inputs, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "curated"
    stats = run_curate([str(mixed_inputs)], out, CurateConfig(workers=1), progress=False)
    return out, stats


def test_funnel_is_consistent(curated):
    out, stats = curated
    assert json.loads((out / "stats.json").read_text()) == stats
    steps = stats["steps"]
    assert [s["step"] for s in steps][:3] == ["read", "html", "normalize"]
    for before, after in zip(steps, steps[1:], strict=False):
        assert before["docs_out"] == after["docs_in"]
        assert before["bytes_out"] == after["bytes_in"]
    for s in steps:
        assert s["docs_in"] - s["docs_out"] == sum(r["docs"] for r in s["reasons"].values())
        assert len(rejected(out, s["step"])) == s["docs_removed"]
    assert stats["output"]["docs"] == len(output(out)) == steps[-1]["docs_out"]


def test_every_bad_input_is_counted_with_its_reason(curated):
    out, stats = curated
    reasons = stats["bad_input"]["reasons"]
    assert reasons["binary file"] == 1
    assert reasons["invalid json"] >= 1  # the broken line (and perhaps the cut file's last line)
    assert reasons["missing text field 'text'"] == 1
    assert reasons["truncated or corrupt input"] == 1
    assert reasons["empty document"] == 1
    assert reasons["no text in html"] == 1
    assert reasons["line too long"] == 1
    huge = [d for d in rejected(out, "normalize") if d["reason"] == "line too long"]
    assert huge[0]["meta"]["text_chars"] == 10_500_000 and len(huge[0]["text"]) == 100_000


def test_duplicates_languages_and_pii(curated):
    out, stats = curated
    kept = output(out)
    assert "c4-0" in kept and "exact-copy" not in kept
    assert "c4-1" in kept and "near-copy" not in kept
    exact = rejected(out, "exact_dedup")
    assert [(d["id"], d["duplicate_of"]) for d in exact] == [("exact-copy", "c4-0")]
    near = rejected(out, "near_dedup")
    # The html page holds the same paragraph as the "pii" document, read earlier: a near copy too.
    assert [(Path(d["id"]).name, d["duplicate_of"]) for d in near] == [
        ("near-copy", "c4-1"),
        ("a.html", "pii"),
    ]
    assert all(0.8 <= d["score"] < 1 for d in near)  # the measured Jaccard with the kept one
    lang = {d["id"]: d for d in rejected(out, "langid")}
    assert lang["german"]["reason"] == "language de" and lang["german"]["score"] > 0.9
    assert "menu" not in kept
    assert "<EMAIL>" in kept["pii"] and "<IP>" in kept["pii"] and "jane.doe" not in kept["pii"]
    assert stats["counters"]["pii_emails_replaced"] >= 1  # the C4 documents hold some too


def test_only_dedup_on_curated_output_finds_nothing_new(curated, tmp_path):
    out, _ = curated
    stats = run_curate(
        [str(out)], tmp_path / "again", CurateConfig(workers=1), only=["dedup"], progress=False
    )
    assert [s["step"] for s in stats["steps"]] == ["read", "exact_dedup", "near_dedup"]
    assert stats["steps"][-1]["docs_out"] == stats["steps"][0]["docs_in"] == len(output(out))
    assert set(output(tmp_path / "again")) == set(output(out))


def test_resume_redoes_only_unfinished_shards_and_parallel_matches(mixed_inputs, curated, tmp_path):
    out, stats = curated
    cfg = CurateConfig(workers=2)
    run_curate([str(mixed_inputs)], tmp_path / "r", cfg, progress=False)
    work = tmp_path / "r" / ".work"
    # Simulate a crash: shard 0 never finished its first pass.
    (work / "p1" / "part-00000.stats.json").unlink()
    (work / "p3" / "part-00000.stats.json").unlink()
    untouched = (work / "p1" / "part-00001.jsonl.zst").stat().st_mtime_ns
    again = run_curate([str(mixed_inputs)], tmp_path / "r", cfg, progress=False)
    assert (work / "p1" / "part-00001.jsonl.zst").stat().st_mtime_ns == untouched
    assert output(tmp_path / "r") == output(out)
    assert again["steps"] == [
        {**s, "seconds": again["steps"][i]["seconds"]} for i, s in enumerate(stats["steps"])
    ]


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="input not found"):
        run_curate([str(tmp_path / "missing")], tmp_path / "o", CurateConfig(), progress=False)
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="quality_model"):
        run_curate(
            [str(tmp_path / "a.jsonl")],
            tmp_path / "o",
            CurateConfig(steps=["quality"]),
            progress=False,
        )
    with pytest.raises(UserError, match="unknown curate step"):
        run_curate(
            [str(tmp_path / "a.jsonl")],
            tmp_path / "o",
            CurateConfig(),
            only=["bogus"],
            progress=False,
        )


def test_report_helpers(curated):
    out, stats = curated
    fig = funnel_figure(stats)
    bars = fig.axes[0].patches
    assert len(bars) == 2 * len(stats["steps"])
    assert [b.get_width() for b in bars[: len(stats["steps"])]] == [
        s["docs_out"] for s in stats["steps"]
    ]
    examples = example_rejects(out, per_step=3)
    assert set(examples) == {s["step"] for s in stats["steps"] if s["docs_removed"]}
    assert all(
        1 <= len(v) <= 3 and {"id", "reason", "score", "text"} <= set(v[0])
        for v in examples.values()
    )


def test_local_executor_needs_neither_ray_nor_fsspec(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from scratchlm.curate.config import CurateConfig\n"
        "from scratchlm.curate.pipeline import run_curate\n"
        f"run_curate([{str(C4_SAMPLE)!r}], {str(tmp_path / 'o')!r}, CurateConfig(workers=2),"
        " progress=False)\n"
        "print(sorted(m for m in ('ray', 'fsspec', 's3fs') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_unreadable_entries_of_an_input_folder_are_skipped_counted_and_named(tmp_path, capsys):
    import os

    folder = tmp_path / "in"
    (folder / "x.jsonl").mkdir(parents=True)  # a folder with a file's name: read as a folder
    write_jsonl(folder / "x.jsonl" / "inner.jsonl", [{"id": "inner", "text": GOOD_PARAGRAPH}])
    write_jsonl(folder / "good.jsonl", [{"id": "good", "text": GOOD_PARAGRAPH}])
    (folder / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    (folder / "loop.jsonl").symlink_to(folder / "loop.jsonl")
    os.mkfifo(folder / "pipe.jsonl")
    cfg = CurateConfig(workers=1, steps=["normalize"])
    stats = run_curate([str(folder)], tmp_path / "out", cfg, progress=False)
    assert stats["skipped_files"] == {
        "dangling symlink": 1,
        "not a regular file": 1,
        "unreadable": 1,
    }
    lines = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert lines == [
        "curate: skipped 3 input entries that cannot be read (1 dangling symlink, "
        f"1 not a regular file, 1 unreadable): {folder / 'gone.jsonl'}, {folder / 'pipe.jsonl'}, "
        f"{folder / 'loop.jsonl'}"
    ]
    assert set(output(tmp_path / "out")) == {"good", "inner"}
    assert stats["steps"][0]["docs_in"] == 2


def test_a_named_input_that_is_not_a_regular_file_is_a_user_error(tmp_path):
    import os

    from scratchlm.curate.readers import find_shards

    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(UserError, match=r"cannot read .*pipe.jsonl: not a regular file"):
        find_shards([str(tmp_path / "pipe.jsonl")])
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    with pytest.raises(UserError, match="input not found"):
        find_shards([str(tmp_path / "gone.jsonl")])
    shards, skipped = find_shards([str(tmp_path / "*.jsonl")] + [str(C4_SAMPLE)])
    assert skipped == {
        "dangling symlink": [str(tmp_path / "gone.jsonl")],
        "not a regular file": [str(tmp_path / "pipe.jsonl")],
    }


def test_a_file_without_read_permission_is_skipped(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": GOOD_PARAGRAPH}])
    write_jsonl(tmp_path / "in" / "secret.jsonl", [{"text": GOOD_PARAGRAPH}]).chmod(0)
    from scratchlm.curate.readers import find_shards

    _, skipped = find_shards([str(tmp_path / "in")])
    assert skipped == {"unreadable": [str(tmp_path / "in" / "secret.jsonl")]}


def test_many_small_files_are_read_in_a_few_tasks(tmp_path):
    """2,000 files of one document each: 2 groups of 1,000 files, so 2 part files and a few
    tasks, not 2,000 of each (10,000 such files took 203 s and wrote 100,000 files)."""
    from curate_samples import story

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2000):
        (folder / f"doc{i:04d}.txt").write_text(f"Number {i}. " + story(i * 7919 % 2000))
    cfg = CurateConfig(workers=2, steps=["normalize", "exact_dedup"])
    stats = run_curate([str(folder)], tmp_path / "out", cfg, progress=False)
    assert stats["shards"] == 2 and stats["output"]["files"] == 2
    assert stats["execution"]["tasks"] < 10
    assert len(list((tmp_path / "out").glob("part-*.jsonl.zst"))) == 2
    assert len(list((tmp_path / "out" / ".work").rglob("*"))) < 30
    kept = output(tmp_path / "out")
    assert len(kept) == 2000 and str(folder / "doc1999.txt") in kept  # ids: the file paths
    assert stats["inputs"] == [str(p) for p in sorted(folder.iterdir())]
    # A group is a task to resume: one that never finished is redone, the other kept.
    work = tmp_path / "out" / ".work"
    (work / "p1" / "part-00001.stats.json").unlink()
    (work / "p3" / "part-00001.stats.json").unlink()
    untouched = (work / "p1" / "part-00000.jsonl.zst").stat().st_mtime_ns
    again = run_curate([str(folder)], tmp_path / "out", cfg, progress=False)
    assert (work / "p1" / "part-00000.jsonl.zst").stat().st_mtime_ns == untouched
    assert output(tmp_path / "out") == kept and again["output"] == stats["output"]
