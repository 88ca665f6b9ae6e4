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
    if data.size == 0:
        return np.zeros(0, np.uint64)
    in_word = np.r_[False, ~_SEPARATOR[data], False].astype(np.int8)
    edges = np.diff(in_word)
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    powers, inverse = _POWERS.get(data.size + 1)
    with np.errstate(over="ignore"):
        prefix = np.r_[np.uint64(0), np.cumsum(data.astype(np.uint64) * powers[: data.size])]
        hashes = (prefix[ends] - prefix[starts]) * inverse[starts]
        return splitmix64(hashes + (ends - starts).astype(np.uint64))


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Sorted unique uint64 hashes of the word n-grams (the whole text when it has fewer words)."""
    words = word_hashes(text)
    if words.size == 0:
        return words
    m = max(1, words.size - n + 1)
    width = min(n, words.size)
    acc = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):
            acc = acc * _SHINGLE_MUL + words[j : j + m]
        return np.unique(splitmix64(acc))


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


def lsh_edges(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Candidate pairs (i, j), i < j: documents that agree on all rows of at least one band.

    Each bucket contributes edges from its lowest index to every other member, which is enough
    for the union-find below to join the whole bucket.
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
        order = np.argsort(bucket, kind="stable")
        sorted_bucket = bucket[order]
        group_start = np.r_[True, sorted_bucket[1:] != sorted_bucket[:-1]]
        leader = order[np.maximum.accumulate(np.where(group_start, np.arange(n), 0))]
        member = ~group_start
        edges.append(np.stack([leader[member], order[member]], axis=1))
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


def near_duplicates(
    signatures: np.ndarray, bands: int, rows: int, threshold: float = 0.0, active=None
) -> tuple[np.ndarray, np.ndarray]:
    """For each document, the index of the one it is kept in favour of (itself when kept), and the
    estimated Jaccard with it. Clusters keep their lowest index, so the result is deterministic."""
    n = signatures.shape[0]
    idx = np.arange(n) if active is None else np.flatnonzero(active)
    edges = lsh_edges(signatures[idx], bands, rows)
    if threshold > 0 and edges.size:
        edges = edges[estimated_jaccard(signatures[idx], edges) >= threshold]
    local = connected_components(len(idx), edges)
    rep = np.arange(n)
    rep[idx] = idx[local]
    score = (signatures == signatures[rep]).mean(axis=1)
    return rep, score
