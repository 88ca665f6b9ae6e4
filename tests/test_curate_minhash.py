import random

import numpy as np
from curate_samples import GOOD_PARAGRAPH, story

from scratchlm.curate.minhash import (
    MinHasher,
    connected_components,
    lsh_edges,
    near_duplicates,
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
