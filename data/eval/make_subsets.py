"""Build the bundled subsets in this folder from the full benchmark files.

Run: python make_subsets.py DATA, where DATA holds eval/ (the full files, same names) and
books/pride_and_prejudice.txt.gz. Each subset is the first N records of its file, in file order,
so `scratchlm eval --limit N` on a full file scores the same examples. gzip with mtime 0, so
the output is byte-for-byte reproducible.
"""

import gzip
import json
import sys
from pathlib import Path

FIRST_N = {
    "hellaswag_val_subsample1000_olmes.jsonl.gz": 200,
    "arc_easy_validation.jsonl.gz": None,
    "arc_challenge_validation.jsonl.gz": None,
    "piqa_validation.jsonl.gz": 500,
    "openbookqa_validation.jsonl.gz": None,
    "copa_validation.jsonl.gz": None,
    "boolq_validation.jsonl.gz": 300,
    "commonsense_qa_validation.jsonl.gz": 500,
    "social_i_qa_validation.jsonl.gz": 500,
    "winogrande_xl_validation.jsonl.gz": 500,
    "lambada_openai.jsonl.gz": 500,
    "gsm8k/test.jsonl.gz": 200,
    "gsm8k/train.jsonl.gz": 500,
}
MMLU = "mmlu_test_val_dev.jsonl.gz"
MMLU_TEST_PER_SUBJECT = 10
BLIMP_PER_PARADIGM = 30
BOOK_CHARS = 60_000


def read(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write("".join(lines).encode("utf-8"))


def main(source: Path, out: Path) -> None:
    for name, n in FIRST_N.items():
        lines = read(source / "eval" / name)
        write(out / name, lines[:n] if n else lines)
    kept, tests = [], {}
    for line in read(source / "eval" / MMLU):
        record = json.loads(line)
        if record["split"] == "dev":
            kept.append(line)
        elif record["split"] == "test":
            tests[record["subject"]] = tests.get(record["subject"], 0) + 1
            if tests[record["subject"]] <= MMLU_TEST_PER_SUBJECT:
                kept.append(line)
    write(out / MMLU, kept)
    for path in sorted((source / "eval" / "blimp").glob("*.jsonl.gz")):
        write(out / "blimp" / path.name, read(path)[:BLIMP_PER_PARADIGM])
    with gzip.open(source / "books" / "pride_and_prejudice.txt.gz", "rt", encoding="utf-8") as f:
        book = f.read()
    cut = book.index("\n\n", BOOK_CHARS)
    (out / "pride_and_prejudice_excerpt.txt").write_text(book[:cut] + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)
