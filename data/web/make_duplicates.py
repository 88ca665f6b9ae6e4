"""Build duplicates.jsonl.gz: exact and near copies of real C4 documents, for the curation demo.

Run from this folder: python make_duplicates.py. Deterministic (seeded).
- 40 exact duplicates: the same text with case and whitespace changed (exact dedup folds both);
- 40 near duplicates: about 1.5% of words replaced and one boilerplate line appended (5-gram
  Jaccard with the original well above 0.8, so MinHash-LSH should catch them).
"""

import gzip
import json
import random

rng = random.Random(0)
docs = [json.loads(line)["text"] for line in gzip.open("c4_demo.jsonl.gz", "rt")]
docs = [d for d in docs if len(d.split()) >= 150]
picked = rng.sample(range(len(docs)), 80)
out = []
for k, i in enumerate(picked[:40]):
    text = docs[i]
    text = text.lower() if k % 2 else "  " + text.replace(" ", "  ").replace("\n", " \n")
    out.append({"id": f"c4-exact-copy-{k}", "text": text})
for k, i in enumerate(picked[40:]):
    words = docs[i].split(" ")
    for j in rng.sample(range(len(words)), max(1, len(words) // 66)):
        words[j] = rng.choice(["great", "really", "new", "best", "local", "more"])
    text = " ".join(words) + "\nShare this article with your friends."
    out.append({"id": f"c4-near-copy-{k}", "text": text})
with gzip.open("duplicates.jsonl.gz", "wt", compresslevel=9) as f:
    for doc in out:
        f.write(json.dumps(doc, ensure_ascii=False) + "\n")
print(len(out), "documents")
