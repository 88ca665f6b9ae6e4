"""MinHash signatures and LSH banding, vectorised with numpy.

Text is simplified (lowercase, punctuation to spaces, whitespace split, as datatrove does) and cut
into word n-gram shingles. No Python loop runs per word or per shingle:
- word hashes are polynomial hashes mod 2^64 of the UTF-8 bytes, taken for every word at once from
  one prefix sum (h(word) = (P[end] - P[start]) * M^-start, with M odd so M^-1 exists mod 2^64);
- shingle hashes combine n consecutive mixed word hashes with n vector operations;
- the permutations are Dietzfelbinger's multiply-add-shift family on 32-bit keys (the top half of
  each mixed shingle hash), h(x) = (a * x + b mod 2^64) >> 32, with a odd: one (shingles x
  permutations) product, three vector operations and a min per block.
Everything wraps mod 2^64 on purpose (numpy unsigned arithmetic), so results are deterministic and
the same on every platform.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

import numpy as np

_M = np.uint64(0x9E3779B97F4A7C15 | 1)
_M_INV = np.uint64(pow(int(_M), -1, 1 << 64))
_SHINGLE_MUL = np.uint64(0xD6E8FEB86659FD93)
_UNICODE_PUNCT = "\u2018\u2019\u201c\u201d\u2026\u2013\u2014\u00ab\u00bb"
_UNICODE_PUNCT_RE = re.compile(f"[{_UNICODE_PUNCT}]")
_SEPARATOR = np.zeros(256, bool)  # bytes that end a word: ASCII whitespace and punctuation
_SEPARATOR[[9, 10, 11, 12, 13, 32]] = True
_SEPARATOR[list(string.punctuation.encode())] = True
_CHUNK = 2048


class _Powers:
    """M^k and M^-k for k < n, grown on demand and shared by every call in a process."""

    def __init__(self) -> None:
        self.pow = np.ones(1, np.uint64)
        self.inv = np.ones(1, np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n > len(self.pow):
            size = max(n, 2 * len(self.pow), 1 << 16)
            with np.errstate(over="ignore"):
                self.pow = np.cumprod(np.r_[np.uint64(1), np.full(size - 1, _M)], dtype=np.uint64)
                self.inv = np.cumprod(
                    np.r_[np.uint64(1), np.full(size - 1, _M_INV)], dtype=np.uint64
                )
        return self.pow[:n], self.inv[:n]


_POWERS = _Powers()


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: spreads every input bit over the whole 64-bit word."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def simple_words(text: str) -> list[str]:
    """The words that word_hashes hashes, as strings (for reference implementations and tests)."""
    text = _UNICODE_PUNCT_RE.sub(" ", text).lower()
    return text.translate({ord(c): " " for c in string.punctuation}).split()


def word_hashes(text: str) -> np.ndarray:
    """One uint64 hash per word of the simplified text."""
    if not text.isascii():
        text = _UNICODE_PUNCT_RE.sub(" ", text)
    data = np.frombuffer(text.lower().encode("utf-8", errors="surrogatepass"), np.uint8)
    n = data.size
    if n == 0:
        return np.zeros(0, np.uint64)
    # Word boundaries are where "is a separator" changes, with separators assumed on both sides:
    # they alternate start, end, start, end...
    separator = np.empty(n + 2, bool)
    separator[0] = separator[-1] = True
    separator[1:-1] = _SEPARATOR[data]
    bounds = np.flatnonzero(separator[1:] != separator[:-1])
    starts, ends = bounds[0::2], bounds[1::2]
    powers, inverse = _POWERS.get(n + 1)
    prefix = np.empty(n + 1, np.uint64)  # integer arrays wrap silently: no errstate needed
    prefix[0] = 0
    np.cumsum(data * powers[:n], out=prefix[1:])
    hashes = (prefix[ends] - prefix[starts]) * inverse[starts]
    hashes += (ends - starts).astype(np.uint64)
    return splitmix64(hashes)


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Sorted unique uint64 hashes of the word n-grams (the whole text when it has fewer words)."""
    words = word_hashes(text)
    if words.size == 0:
        return words
    m = max(1, words.size - n + 1)
    acc = words[:m].copy()
    for j in range(1, min(n, words.size)):
        acc *= _SHINGLE_MUL
        acc += words[j : j + m]
    acc = splitmix64(acc)
    acc.sort()
    return acc[np.concatenate(([True], acc[1:] != acc[:-1]))]


def shingle_keys(shingles: np.ndarray) -> np.ndarray:
    """The sorted unique uint32 keys that MinHasher permutes (the top halves of the shingle
    hashes); exact Jaccard is measured on these, the very sets the signatures estimate."""
    keys = (shingles >> np.uint64(32)).astype(np.uint32)  # sorted, as shingles are
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if keys.size else keys


class MinHasher:
    """MinHash signatures of n_perm permutations; the same seed gives the same signatures."""

    def __init__(self, n_perm: int, seed: int = 1, ngram: int = 5) -> None:
        rng = np.random.default_rng(seed)
        top = np.iinfo(np.uint64).max
        self.a = rng.integers(1, top, n_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self.b = rng.integers(0, top, n_perm, dtype=np.uint64, endpoint=True)
        self.n_perm = n_perm
        self.ngram = ngram

    def signature_of_hashes(self, shingles: np.ndarray) -> np.ndarray:
        """uint32 signature; all 2^32-1 when there are no shingles."""
        sig = np.full(self.n_perm, np.iinfo(np.uint32).max, np.uint64)
        keys = shingles >> np.uint64(32)  # the top half of a splitmix64 output is well mixed
        with np.errstate(over="ignore"):
            for i in range(0, keys.size, _CHUNK):
                h = self.a * keys[i : i + _CHUNK, None]
                h += self.b
                h >>= np.uint64(32)
                np.minimum(sig, h.min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_hashes(shingle_hashes(text, self.ngram))


LSH_WINDOW = 16
"""In a bucket, each document is paired with up to this many earlier members: every pair of a
small bucket, and a bounded number of pairs (still connecting the bucket) for a huge one."""

ESTIMATE_MARGIN = 0.2
"""Candidates whose signature estimate is this far under the verification threshold are dropped
without reading their shingles: with 112 permutations the estimate's standard error at Jaccard 0.8
is 0.04, so a true 0.8 pair is lost this way with odds of about 1 in 10^7."""


def lsh_edges(
    signatures: np.ndarray, bands: int, rows: int, window: int = LSH_WINDOW
) -> np.ndarray:
    """Candidate pairs (i, j), i < j, sorted: documents that agree on all rows of at least one band.

    Within a bucket, members in index order are paired with up to `window` earlier members, so
    verification can still join two members that both differ from the bucket's first.
    """
    n = signatures.shape[0]
    if n < 2:
        return np.zeros((0, 2), np.int64)
    edges = []
    for band in range(bands):
        block = np.ascontiguousarray(signatures[:, band * rows : (band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).reshape(-1)
        _, bucket = np.unique(keys, return_inverse=True)
        bucket = bucket.reshape(-1)
        order = np.argsort(bucket, kind="stable")  # by bucket, then by index
        sorted_bucket = bucket[order]
        for lag in range(1, min(window, n - 1) + 1):
            same = np.flatnonzero(sorted_bucket[lag:] == sorted_bucket[:-lag])
            if same.size == 0:
                break  # no bucket has more than `lag` members
            edges.append(np.stack([order[same], order[same + lag]], axis=1))
    if not edges:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(edges), axis=0)


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """For each node, the lowest node index of its component (min-label propagation)."""
    labels = np.arange(n)
    if edges.size == 0:
        return labels
    u, v = edges[:, 0], edges[:, 1]
    while True:
        low = np.minimum(labels[u], labels[v])
        new = labels.copy()
        np.minimum.at(new, u, low)
        np.minimum.at(new, v, low)
        np.minimum.at(new, labels[u], low)  # hooking the roots too speeds convergence
        new = new[new]  # pointer jumping: follow labels towards the root
        if np.array_equal(new, labels):
            return labels
        labels = new


def estimated_jaccard(signatures: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return (signatures[edges[:, 0]] == signatures[edges[:, 1]]).mean(axis=1)


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted unique hash arrays (shingle_hashes output)."""
    if a.size > b.size:
        a, b = b, a
    if a.size == 0:
        return 1.0 if b.size == 0 else 0.0
    at = np.searchsorted(b, a)
    common = int(np.count_nonzero(b[np.minimum(at, b.size - 1)] == a))
    return common / (a.size + b.size - common)


def candidate_pairs(
    signatures: np.ndarray, bands: int, rows: int, threshold: float = 0.0, active=None
) -> np.ndarray:
    """LSH candidate pairs over the active documents (indices into all of them); with a
    verification threshold, those whose estimate is hopelessly low are already dropped."""
    idx = np.arange(signatures.shape[0]) if active is None else np.flatnonzero(active)
    edges = idx[lsh_edges(signatures[idx], bands, rows)]
    if threshold > 0 and edges.size:
        edges = edges[estimated_jaccard(signatures, edges) >= threshold - ESTIMATE_MARGIN]
    return edges.reshape(-1, 2)


def verify_pairs(
    edges: np.ndarray, threshold: float, shingles_of: Callable[[int], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs whose exact Jaccard is at least threshold, and that Jaccard."""
    jaccard = np.array(
        [exact_jaccard(shingles_of(int(u)), shingles_of(int(v))) for u, v in edges], np.float64
    )
    keep = jaccard >= threshold
    return edges[keep].reshape(-1, 2), jaccard[keep]


def resolve_duplicates(
    signatures: np.ndarray,
    edges: np.ndarray,
    threshold: float = 0.0,
    shingles_of: Callable[[int], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each document, the one it is kept in favour of (itself when kept) and their Jaccard.

    With threshold > 0 an edge counts only when the exact Jaccard of the two documents' shingle
    sets (from shingles_of) is at least threshold, and the score is the exact Jaccard with the
    kept document; with 0 every LSH edge counts and the score is the signature estimate.
    Clusters are connected components and keep their lowest index (the earliest document of the
    run), so the result is deterministic. A document joined through a chain (a~b, b~c) can score
    under the threshold against the kept one.
    """
    n = signatures.shape[0]
    verify = threshold > 0 and edges.size > 0
    if verify:
        if shingles_of is None:
            raise ValueError("verification needs the documents' shingles")
        edges, _ = verify_pairs(edges, threshold, shingles_of)
    rep = connected_components(n, edges)
    score = np.ones(n, np.float32)
    dup = np.flatnonzero(rep != np.arange(n))
    if verify:
        score[dup] = [exact_jaccard(shingles_of(int(d)), shingles_of(int(rep[d]))) for d in dup]
    else:
        score[dup] = (signatures[dup] == signatures[rep[dup]]).mean(axis=1)
    return rep, score


def near_duplicates(
    signatures: np.ndarray,
    bands: int,
    rows: int,
    threshold: float = 0.0,
    active=None,
    shingles_of: Callable[[int], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """candidate_pairs then resolve_duplicates, for shingles that are at hand."""
    edges = candidate_pairs(signatures, bands, rows, threshold, active)
    return resolve_duplicates(signatures, edges, threshold, shingles_of)
