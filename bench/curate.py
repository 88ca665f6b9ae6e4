"""Curation speed: the local and the Ray executor, and scratchlm against datatrove, in one run.

    python bench/curate.py [--repeats N] [--json] [--skip-datatrove] [--skip-ray] [--quick]

1. Executors: the default steps over data/web (4.5 MB, 1,095 records: JSON Lines, a WARC, a WET),
   with the local executor and with Ray, 1 and 2 workers each. Ray runs on an instance started
   once before timing (as a cluster would be), after one untimed warm-up run. The runs are
   interleaved and repeated; each configuration keeps its fastest run (the machine is shared).
   ray_overhead = local docs/s over Ray docs/s at 2 workers.
2. The per-core rate of each step (documents per CPU second), from the step timings: the input
   of docs/scale.md's Common Crawl estimate.
3. datatrove 0.10 with the same steps and thresholds (bench/datatrove_curate.py) against
   scratchlm, 2 workers each, on data/web's JSON Lines records (1,077 documents; datatrove gets
   them as the same 4 files with the same ids). Documents kept by one side only are listed by the
   step of each side that removed them. datatrove is a bench-only requirement:
   pip install -r bench/requirements-datatrove.txt
With --json the last line is one JSON object with the figures. --quick checks the script in
seconds: one run of each, 30 saved pages, one pass over the WARC files, 200 documents against
datatrove.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scratchlm.curate.config import CurateConfig  # noqa: E402
from scratchlm.curate.pipeline import read_docs, run_curate  # noqa: E402

WEB = ROOT / "data" / "web"
HTML_PAGES = ROOT.parent / "shared" / "data" / "web" / "trafilatura_pages.jsonl.gz"
JSONL = ["dolma_cc_CC-MAIN-2019-30_text.jsonl.gz", "c4_demo.jsonl.gz", "duplicates.jsonl.gz"]
QUICK = dict(repeats=1, html_limit=30, warc_passes=1, datatrove_docs=200)


def timed_run(inputs: list[str], out: Path, cfg: CurateConfig) -> tuple[float, dict]:
    t0 = time.perf_counter()
    stats = run_curate(inputs, out, cfg, progress=False)
    return time.perf_counter() - t0, stats


def executors(tmp: Path, repeats: int, with_ray: bool) -> dict:
    configs = [("local", 1), ("local", 2)] + ([("ray", 1), ("ray", 2)] if with_ray else [])
    if with_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        timed_run([str(WEB)], tmp / "warmup", CurateConfig(executor="ray", workers=2))
    best: dict[tuple[str, int], tuple[float, dict]] = {}
    for r in range(repeats):
        for kind, workers in configs:
            out = tmp / f"{kind}{workers}-{r}"
            wall, stats = timed_run([str(WEB)], out, CurateConfig(executor=kind, workers=workers))
            if (kind, workers) not in best or wall < best[(kind, workers)][0]:
                best[(kind, workers)] = (wall, stats)
    return best


def html_rate(path: Path, limit: int = 300) -> float | None:
    """Pages per CPU second of the html step on real saved pages (the sample has few HTML
    pages: 16 in the WARC excerpt), or None when the page set is not there."""
    if not path.is_file():
        return None
    from scratchlm.curate.text import html_to_text

    pages = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line, _ in zip(f, range(limit), strict=False):
            pages.append(json.loads(line)["html"])
    t0 = time.process_time()
    for page in pages:
        html_to_text(page)
    return len(pages) / (time.process_time() - t0)


def warc_read_rate(folder: Path, passes: int = 5) -> float | None:
    """HTML documents per CPU second that the WARC reader yields (WARC parsing, gzip, charset
    decoding) on the real WARC files of ../shared/data/web, or None when they are not there."""
    from scratchlm.curate.readers import find_shards, read_shard

    files = sorted(str(p) for p in folder.glob("*.warc.gz")) if folder.is_dir() else []
    if not files:
        return None
    shards, _ = find_shards(files)
    cfg = CurateConfig()
    t0, n = time.process_time(), 0
    for _ in range(passes):
        n += sum(1 for s in shards for d in read_shard(s, cfg) if "reason" not in d)
    return n / (time.process_time() - t0)


def kept_ids(out: Path) -> set[str]:
    return {d["id"] for p in sorted(out.glob("part-*.jsonl.zst")) for d in read_docs(str(p))}


def removed_by(out: Path) -> dict[str, str]:
    found = {}
    for step in (out / "rejected").iterdir():
        for p in step.glob("*.zst"):
            for d in read_docs(str(p)):
                found[d["id"]] = step.name
    return found


def prepare_jsonl(folder: Path, limit: int = 0) -> int:
    """data/web's JSON Lines records (the first `limit`; 0: all) as 4 plain files with explicit
    ids, for both sides."""
    folder.mkdir()
    records = []
    for name in JSONL:
        with gzip.open(WEB / name, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                obj = json.loads(line)
                records.append({"id": f"{name.split('.')[0]}:{i}", "text": obj["text"]})
    records = records[:limit] if limit else records
    quarter = -(-len(records) // 4)
    for k in range(4):
        with open(folder / f"part{k}.jsonl", "w", encoding="utf-8") as f:
            for rec in records[k * quarter : (k + 1) * quarter]:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return len(records)


def versus_datatrove(tmp: Path, repeats: int, limit: int) -> dict:
    from datatrove_curate import run_datatrove

    folder = tmp / "jsonl"
    n = prepare_jsonl(folder, limit)
    ours, theirs = None, None
    for r in range(repeats):
        wall, stats = timed_run([str(folder)], tmp / f"ours-{r}", CurateConfig(workers=2))
        if ours is None or wall < ours[0]:
            ours = (wall, stats, tmp / f"ours-{r}")
        result = run_datatrove(folder, tmp / f"datatrove-{r}", workers=2)
        if theirs is None or result["wall"] < theirs["wall"]:
            theirs = result
    ours_kept, ours_removed = kept_ids(ours[2]), removed_by(ours[2])
    all_ids = set(ours_kept) | set(ours_removed)
    agree = sum((i in ours_kept) == (i in theirs["kept"]) for i in all_ids)
    differences = collections.Counter()
    for i in all_ids:
        if (i in ours_kept) != (i in theirs["kept"]):
            mine = "kept" if i in ours_kept else ours_removed.get(i, "?")
            other = "kept" if i in theirs["kept"] else theirs["removed"].get(i, "?")
            differences[(mine, other)] += 1
    return {
        "docs": n,
        "ours_wall": ours[0],
        "datatrove_wall": theirs["wall"],
        "ours_kept": len(ours_kept),
        "datatrove_kept": len(theirs["kept"]),
        "agreement": agree / len(all_ids),
        "differences": differences,
        "ours_stats": ours[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--html-pages", type=Path, default=HTML_PAGES)
    ap.add_argument("--html-limit", type=int, default=300, help="saved pages for the html rate")
    ap.add_argument("--warc-passes", type=int, default=5, help="passes over the WARC files")
    ap.add_argument("--datatrove-docs", type=int, default=0, help="first N vs datatrove (0: all)")
    ap.add_argument("--quick", action="store_true", help="a check of the script, in seconds")
    args = ap.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        ap.set_defaults(**QUICK)
        args = ap.parse_args()
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        best = executors(Path(tmp), args.repeats, not args.skip_ray)
        print(f"{'executor':10} {'workers':>7} {'wall s':>7} {'docs/s':>7} {'MB/s':>6} {'kept':>5}")
        rates = {}
        for (kind, workers), (wall, stats) in best.items():
            read = stats["steps"][0]
            rates[f"{kind}{workers}"] = read["docs_in"] / wall
            print(
                f"{kind:10} {workers:7d} {wall:7.2f} {read['docs_in'] / wall:7.0f} "
                f"{read['bytes_in'] / 1e6 / wall:6.2f} {stats['output']['docs']:5d}"
            )
            result[f"{kind}{workers}_docs_per_s"] = round(read["docs_in"] / wall, 1)
            result[f"{kind}{workers}_mb_per_s"] = round(read["bytes_in"] / 1e6 / wall, 3)
        if "ray2" in rates:
            result["ray_overhead"] = round(rates["local2"] / rates["ray2"], 3)
            print(
                "Ray overhead at 2 workers (local docs/s over Ray docs/s): "
                f"{result['ray_overhead']:.2f}"
            )
        stats = best[("local", 1)][1]
        print(f"\n{'step':18} {'docs in':>8} {'docs out':>9} {'cpu s':>7} {'docs/cpu s':>10}")
        per_core = {}
        for s in stats["steps"]:
            rate = s["docs_in"] / s["seconds"] if s["seconds"] else float("inf")
            per_core[s["step"]] = round(rate, 1)
            print(
                f"{s['step']:18} {s['docs_in']:8d} {s['docs_out']:9d} "
                f"{s['seconds']:7.2f} {rate:10.0f}"
            )
        rate = html_rate(args.html_pages, args.html_limit)
        if rate is not None:
            per_core["html_pages"] = round(rate, 1)
            print(
                f"html on {args.html_pages.name} ({args.html_limit} pages): "
                f"{rate:.0f} pages per CPU second"
            )
        rate = warc_read_rate(args.html_pages.parent, args.warc_passes)
        if rate is not None:
            per_core["read_warc"] = round(rate, 1)
            print(f"read of the WARC files there: {rate:.0f} pages per CPU second")
        result["step_docs_per_cpu_s"] = per_core
        result["step_seconds"] = {s["step"]: s["seconds"] for s in stats["steps"]}
        result["docs_in"] = stats["steps"][0]["docs_in"]
        if not args.skip_datatrove and importlib.util.find_spec("datatrove") is None:
            print("\ndatatrove is not installed (pip install -r bench/requirements-datatrove.txt)")
        elif not args.skip_datatrove:
            dt = versus_datatrove(Path(tmp), args.repeats, args.datatrove_docs)
            speedup = dt["datatrove_wall"] / dt["ours_wall"]
            print(f"\nscratchlm vs datatrove 0.10 on {dt['docs']} JSON Lines documents, 2 workers:")
            print(f"{'':10} {'wall s':>7} {'docs/s':>7} {'kept':>5}")
            for name, wall, kept in [
                ("scratchlm", dt["ours_wall"], dt["ours_kept"]),
                ("datatrove", dt["datatrove_wall"], dt["datatrove_kept"]),
            ]:
                print(f"{name:10} {wall:7.2f} {dt['docs'] / wall:7.0f} {kept:5d}")
            print(f"speedup {speedup:.2f}x; the two agree on {dt['agreement']:.1%} of documents")
            print("documents kept by one side only (scratchlm step, datatrove step): count")
            for (mine, other), count in dt["differences"].most_common():
                print(f"  {mine:18} {other:18} {count}")
            result["speedup_vs_datatrove"] = round(speedup, 3)
            result["kept_agreement_vs_datatrove"] = round(dt["agreement"], 4)
            result["datatrove_docs_per_s"] = round(dt["docs"] / dt["datatrove_wall"], 1)
            result["scratchlm_docs_per_s_jsonl"] = round(dt["docs"] / dt["ours_wall"], 1)
            result["kept"] = {"scratchlm": dt["ours_kept"], "datatrove": dt["datatrove_kept"]}
            result["differences"] = {f"{a} / {b}": c for (a, b), c in dt["differences"].items()}
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
