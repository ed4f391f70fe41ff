"""A seeded generator of an XMC-like dataset with label texts.

Each label owns a small vocabulary of pseudo-words; its title shows only the first few of
them, its content all of them. A point draws several labels with Zipf-distributed popularity
(a few head labels, a long tail) and its text mixes words from its labels' vocabularies with
noise words. Words that appear only in a label's content must be learned from training pairs,
so a trained dual encoder clearly beats an untrained one on titles.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from dexml.config import SyntheticParams
from dexml.data.dataset import DEFAULT_PROPENSITY, LabelSet, Split, XMCDataset

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u"]
TITLE_WORDS = 3


def _words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct pronounceable pseudo-words of 2-3 syllables."""
    out: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < n:
        syll = rng.integers(2, 4)
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syll))
        if w not in out:
            out.add(w)
            ordered.append(w)
    return ordered


def _points(rng, p: SyntheticParams, n: int, prior: np.ndarray, vocab: list[list[str]],
            noise: list[str], prefix: str) -> Split:
    L = len(vocab)
    uids, titles, indptr, indices = [], [], [0], []
    for i in range(n):
        k = min(L, 1 + rng.poisson(p.labels_per_point - 1))
        labels = np.sort(rng.choice(L, size=k, replace=False, p=prior))
        n_noise = int(round(p.query_words * p.noise_fraction))
        words = [rng.choice(vocab[j]) for j in rng.choice(labels, size=p.query_words - n_noise)]
        words += list(rng.choice(noise, size=n_noise))
        rng.shuffle(words)
        uids.append(f"{prefix}{i:07d}")
        titles.append(" ".join(words))
        indices.extend(labels.tolist())
        indptr.append(len(indices))
    y = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(n, L))
    return Split(uids, titles, [""] * n, y)


def generate(p: SyntheticParams) -> XMCDataset:
    rng = np.random.default_rng(p.seed)
    L = p.num_labels
    words = _words(rng, L * p.words_per_label + 400)
    vocab = [words[j * p.words_per_label:(j + 1) * p.words_per_label] for j in range(L)]
    noise = words[L * p.words_per_label:]
    # Popularity by a random rank, so label id says nothing about frequency.
    ranks = rng.permutation(L) + 1
    prior = ranks.astype(np.float64) ** -p.zipf_exponent
    prior /= prior.sum()
    lbl = LabelSet(
        [f"L{j:06d}" for j in range(L)],
        [" ".join(v[:TITLE_WORDS]) for v in vocab],
        [" ".join(v) for v in vocab],
    )
    trn = _points(rng, p, p.num_train, prior, vocab, noise, "trn")
    tst = _points(rng, p, p.num_test, prior, vocab, noise, "tst")
    empty = np.zeros((0, 2), np.int64)
    return XMCDataset(trn, tst, lbl, empty, empty.copy(), name="synthetic", propensity=DEFAULT_PROPENSITY)
