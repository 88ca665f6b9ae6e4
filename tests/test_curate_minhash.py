import random

import numpy as np
from curate_samples import GOOD_PARAGRAPH, story

from scratchlm.curate.minhash import (
    MinHasher,
    candidate_pairs,
    connected_components,
    exact_jaccard,
    lsh_edges,
    near_duplicates,
    resolve_duplicates,
    shingle_hashes,
    word_hashes,
)


def true_jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = set(shingle_hashes(a, n).tolist()), set(shingle_hashes(b, n).tolist())
    return len(sa & sb) / len(sa | sb)


def test_word_hashes_depend_on_word_only():
    h = word_hashes("Apple, banana apple\n BANANA cherry")
    assert len(h) == 5
    assert h[0] == h[2] and h[1] == h[3] and len(set(h.tolist())) == 3


def test_shingles_are_word_5grams():
    text = " ".join(f"w{i}" for i in range(12))
    assert len(shingle_hashes(text, 5)) == 8
    assert len(shingle_hashes("only three words", 5)) == 1
    assert len(shingle_hashes("a b c d e a b c d e a b c d e", 5)) == 5  # a set: repeats once


def test_signatures_are_deterministic_and_seeded():
    a, b = MinHasher(112, seed=1), MinHasher(112, seed=1)
    assert np.array_equal(a.signature(GOOD_PARAGRAPH), b.signature(GOOD_PARAGRAPH))
    assert not np.array_equal(
        a.signature(GOOD_PARAGRAPH), MinHasher(112, seed=2).signature(GOOD_PARAGRAPH)
    )
    assert a.signature(GOOD_PARAGRAPH).dtype == np.uint32


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(0)
    hasher = MinHasher(512, seed=3)
    base = " ".join(story(i) for i in range(5)).split()
    errors = []
    for rate in (0.01, 0.03, 0.06, 0.1):
        words = [w if rng.random() > rate else "x" + w for w in base]
        edited = " ".join(words)
        original = " ".join(base)
        estimate = (hasher.signature(original) == hasher.signature(edited)).mean()
        errors.append(abs(estimate - true_jaccard(original, edited)))
    assert max(errors) < 0.07  # 512 permutations: standard error about 0.02


def test_lsh_finds_near_duplicates_and_keeps_the_first():
    hasher = MinHasher(112, seed=1)
    rng = random.Random(1)
    vocab = GOOD_PARAGRAPH.split()
    docs = [" ".join(rng.choice(vocab) for _ in range(150)) for _ in range(20)]
    docs.append(docs[3] + " and")  # near copy of 3
    docs.append(docs[7] + " One more line at the end.")  # near copy of 7
    sigs = np.stack([hasher.signature(d) for d in docs])
    rep, score = near_duplicates(sigs, 14, 8)
    assert rep.tolist() == list(range(20)) + [3, 7]
    assert score[20] > 0.8 and score[21] > 0.8


def test_lsh_edges_and_components():
    sigs = np.array([[1, 1, 5, 5], [1, 1, 6, 6], [9, 9, 6, 6], [3, 3, 3, 3]], np.uint32)
    assert lsh_edges(sigs, bands=2, rows=2).tolist() == [[0, 1], [1, 2]]
    assert connected_components(4, lsh_edges(sigs, 2, 2)).tolist() == [0, 0, 0, 3]


def test_inactive_documents_are_never_clustered():
    sigs = np.zeros((3, 8), np.uint32)
    rep, _ = near_duplicates(sigs, 2, 4, active=np.array([True, False, True]))
    assert rep.tolist() == [0, 1, 0]


def test_buckets_pair_every_member_up_to_the_window():
    same = np.zeros((4, 2), np.uint32)  # one bucket of four
    assert lsh_edges(same, 1, 2).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert lsh_edges(same, 1, 2, window=1).tolist() == [[0, 1], [1, 2], [2, 3]]


def test_exact_jaccard_of_sorted_hashes():
    rng = random.Random(2)
    for _ in range(20):
        a = {rng.randrange(50) for _ in range(rng.randrange(1, 30))}
        b = {rng.randrange(50) for _ in range(rng.randrange(1, 30))}
        got = exact_jaccard(np.array(sorted(a), np.uint64), np.array(sorted(b), np.uint64))
        assert got == len(a & b) / len(a | b)
    assert exact_jaccard(np.zeros(0, np.uint64), np.zeros(0, np.uint64)) == 1.0


def replace_words(words: list[str], count: int, tag: str) -> str:
    """Replace `count` words spread 20 apart: each replacement changes 5 of the 5-gram shingles."""
    out = list(words)
    for k in range(count):
        out[10 + 20 * k] = f"{tag}{k}"
    return " ".join(out)


def test_verification_keeps_a_07_candidate_and_removes_a_09_copy():
    # A 0.7 pair is an LSH candidate of 14 x 8 bands with probability 0.56; this text is one.
    rng = random.Random(2)
    words = [f"w{rng.randrange(10**6)}" for _ in range(200)]  # 196 distinct shingles
    base = " ".join(words)
    docs = [
        base,
        replace_words(words, 7, "x"),  # Jaccard 161 / 231 = 0.70
        replace_words(words, 2, "y"),  # Jaccard 186 / 206 = 0.90
        " ".join(f"v{rng.randrange(10**6)}" for _ in range(200)),  # unrelated
    ]
    shingles = [shingle_hashes(d, 5) for d in docs]
    assert round(exact_jaccard(shingles[0], shingles[1]), 3) == round(161 / 231, 3)
    assert round(exact_jaccard(shingles[0], shingles[2]), 3) == round(186 / 206, 3)
    sigs = np.stack([MinHasher(112, seed=1).signature(d) for d in docs])
    edges = candidate_pairs(sigs, 14, 8, threshold=0.8)
    assert [0, 1] in edges.tolist() and [0, 2] in edges.tolist()  # both are LSH candidates

    lsh_only, _ = resolve_duplicates(sigs, edges, threshold=0.0)
    assert lsh_only.tolist() == [0, 0, 0, 3]  # LSH alone removes the 0.7 copy too

    rep, score = resolve_duplicates(sigs, edges, 0.8, shingles.__getitem__)
    assert rep.tolist() == [0, 1, 0, 3]  # the 1-2 candidate (Jaccard 0.63) is dropped as well
    assert score[2] == np.float32(186 / 206)
    rep2, _ = near_duplicates(sigs, 14, 8, 0.8, shingles_of=shingles.__getitem__)
    assert rep2.tolist() == rep.tolist()
