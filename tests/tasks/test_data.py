"""Tests of flatmin.data: checksummed cache, splits, label noise, text/graph helpers, datasets."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from flatmin.data import (
    IGNORE_INDEX,
    ChecksumError,
    Dataset,
    DataUnavailableError,
    Graph,
    GraphSplit,
    NodeSplit,
    TensorSplit,
    cache_root,
    dataset_names,
    get_dataset_info,
    load_dataset,
    stratified_indices,
    verify,
    with_label_noise,
)
from flatmin.data._cache import (
    LocalDirectory,
    UpstreamURL,
    _install_verified,
    ensure_files,
    sha256_file,
)
from flatmin.data.batching import Batches, collate_graphs
from flatmin.data.text import build_vocab, encode, tokenize

GOOD = b"the quick brown fox\n" * 50


@pytest.fixture()
def good_files(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(GOOD)
    (src / "b.txt").write_bytes(GOOD[::-1])
    files = {n: sha256_file(src / n) for n in ("a.txt", "b.txt")}
    return src, files


# --- cache: checksums, atomic writes, errors --------------------------------------------------


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    p = tmp_path / "x"
    p.write_bytes(os.urandom(3 << 20))  # > one read chunk
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_fetch_from_local_then_cache_hit(tmp_path: Path, good_files) -> None:
    src, files = good_files
    res = ensure_files("toy", files, (LocalDirectory("toy", str(src)),), cache_dir=tmp_path / "c")
    assert res.source.startswith("local directory")
    assert (res.directory / "a.txt").read_bytes() == GOOD
    assert res.nbytes == 2 * len(GOOD)
    # Second call: verified cache, the (now missing) source is not needed.
    (src / "a.txt").unlink()
    again = ensure_files("toy", files, (LocalDirectory("toy", str(src)),), cache_dir=tmp_path / "c")
    assert again.source == "cache"


def test_fetch_from_upstream_url(tmp_path: Path, good_files) -> None:
    """The URL source downloads, verifies and installs (file:// URLs: no network needed)."""
    src, files = good_files
    urls = {n: (src / n).as_uri() for n in files}
    sources = (LocalDirectory("toy", str(tmp_path / "missing")), UpstreamURL(urls))
    res = ensure_files("toy", files, sources, cache_dir=tmp_path / "c")
    assert res.source.startswith("upstream URL")
    assert (res.directory / "a.txt").read_bytes() == GOOD
    assert (res.directory / "b.txt").read_bytes() == GOOD[::-1]


def test_checksum_mismatch_gives_clear_error(tmp_path: Path, good_files) -> None:
    src, files = good_files
    (src / "a.txt").write_bytes(b"tampered")
    sources = (LocalDirectory("toy", str(src)), UpstreamURL({"a.txt": "http://127.0.0.1:9/a"}))
    with pytest.raises(DataUnavailableError) as info:
        ensure_files("toy", files, sources, cache_dir=tmp_path / "c")
    msg = str(info.value)
    assert "Could not obtain dataset 'toy'" in msg
    assert "Checksum mismatch for a.txt" in msg
    assert "upstream URL (127.0.0.1:9)" in msg  # every source tried is listed
    assert f"{files['a.txt']}  a.txt" in msg  # and the expected hashes for a manual copy
    assert not (tmp_path / "c" / "toy" / "a.txt").exists()


def test_install_verified_leaves_nothing_on_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.write_bytes(GOOD)
    with pytest.raises(ChecksumError, match="Checksum mismatch for d"):
        _install_verified(src, tmp_path / "out" / "d", "0" * 64)
    assert list((tmp_path / "out").iterdir()) == []


def test_truncated_file_is_detected_and_refetched(tmp_path: Path, good_files) -> None:
    src, files = good_files
    cache = tmp_path / "c"
    ensure_files("toy", files, (LocalDirectory("toy", str(src)),), cache_dir=cache)
    target = cache / "toy" / "a.txt"
    target.write_bytes(GOOD[:17])  # a fetch killed half-way through an in-place write
    states = {"a.txt": "corrupt", "b.txt": "ok"}
    from flatmin.data._cache import verify_files

    assert verify_files(cache / "toy", files) == states
    res = ensure_files("toy", files, (LocalDirectory("toy", str(src)),), cache_dir=cache)
    assert res.source.startswith("local directory")
    assert target.read_bytes() == GOOD


class _DiesMidway:
    """A source that writes half a file and then dies, like a killed download."""

    def describe(self) -> str:
        return "dying source"

    def manual_hint(self) -> str:
        return "n/a"

    def stage(self, files: Mapping[str, str], workdir: Path) -> dict[str, Path]:
        (workdir / "a.txt").write_bytes(GOOD[:10])
        raise OSError("connection reset")


def test_killed_fetch_never_leaves_a_complete_looking_file(tmp_path: Path, good_files) -> None:
    _, files = good_files
    with pytest.raises(DataUnavailableError, match="dying source: connection reset"):
        ensure_files("toy", files, (_DiesMidway(),), cache_dir=tmp_path)
    leftovers = [p for p in (tmp_path / "toy").rglob("*") if p.is_file()]
    assert [p.name for p in leftovers] == [".fetch.lock"]  # the (empty) lock of the fetch
    assert leftovers[0].read_bytes() == b""


def test_force_refetches(tmp_path: Path, good_files) -> None:
    src, files = good_files
    ensure_files("toy", files, (LocalDirectory("toy", str(src)),), cache_dir=tmp_path)
    res = ensure_files(
        "toy", files, (LocalDirectory("toy", str(src)),), cache_dir=tmp_path, force=True
    )
    assert res.source != "cache"


def test_cache_root_env_and_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLATMIN_DATA", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("FLATMIN_DATA")
    assert cache_root().name == "flatmin"


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(ValueError, match="Unknown dataset: 'imagenet'") as info:
        get_dataset_info("imagenet")
    for name in dataset_names():
        assert name in str(info.value)


def test_verify_reports_missing_and_corrupt(tmp_path: Path) -> None:
    assert verify("mutag", cache_dir=tmp_path).state == "missing"
    d = tmp_path / "mutag"
    d.mkdir()
    (d / "MUTAG_A.txt").write_text("1, 2\n")
    res = verify("mutag", cache_dir=tmp_path)
    assert res.state == "corrupt"
    assert "MUTAG_A.txt: corrupt" in res.problems


def test_registry_entries_are_complete() -> None:
    for name in dataset_names():
        info = get_dataset_info(name)
        assert info.domain in {"vision", "text", "graph"}
        assert info.files and all(re.fullmatch("[0-9a-f]{64}", h) for h in info.files.values())
        assert info.sources and info.license


# --- splits and label noise -------------------------------------------------------------------


def test_stratified_indices_per_class_counts() -> None:
    labels = torch.tensor([0] * 50 + [1] * 31 + [2] * 9)
    train, val, test = stratified_indices(labels, (0.7, 0.1, 0.2), seed=3)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(90))  # a partition
    for c, n in ((0, 50), (1, 31), (2, 9)):
        assert int((labels[val] == c).sum()) == round(0.1 * n)
        assert int((labels[test] == c).sum()) == round(0.2 * n)
    again = stratified_indices(labels, (0.7, 0.1, 0.2), seed=3)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    other = stratified_indices(labels, (0.7, 0.1, 0.2), seed=4)
    assert not torch.equal(test, other[2])


@pytest.mark.parametrize(
    ("labels", "fractions", "match"),
    [
        (torch.zeros(3, 2), (0.5, 0.5), "Invalid labels shape"),
        (torch.zeros(4), (0.5, -0.1), "Invalid fractions"),
        (torch.zeros(4), (0.0, 0.6, 0.4), "Invalid fractions"),
    ],
)
def test_stratified_indices_errors(labels, fractions, match) -> None:
    with pytest.raises(ValueError, match=match):
        stratified_indices(labels, fractions, seed=0)


def _toy_dataset(n: int = 200, k: int = 5) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, k, (n,), generator=gen)
    split = TensorSplit(torch.randn(n, 3, generator=gen), y)
    val = TensorSplit(torch.randn(20, 3), torch.arange(20) % k)
    test = TensorSplit(torch.randn(30, 3), torch.arange(30) % k)
    return Dataset("toy", "vision", split, val, test, k, tuple("abcde"[:k]))


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.4, 0.8, 1.0])
def test_label_noise_flips_exact_fraction(fraction: float) -> None:
    ds = _toy_dataset()
    noisy = with_label_noise(ds, fraction, seed=7)
    changed = noisy.train.targets != ds.train.targets
    assert int(changed.sum()) == round(fraction * 200)  # every chosen label really changes
    assert noisy.train.targets.min() >= 0 and noisy.train.targets.max() < 5
    assert noisy.val is ds.val and noisy.test is ds.test
    assert torch.equal(noisy.train.clean_targets, ds.train.targets)
    assert torch.equal(noisy.train.inputs, ds.train.inputs)
    again = with_label_noise(ds, fraction, seed=7)
    assert torch.equal(again.train.targets, noisy.train.targets)


def test_label_noise_is_roughly_symmetric() -> None:
    ds = _toy_dataset(n=5000, k=5)
    noisy = with_label_noise(ds, 0.5, seed=1)
    changed = noisy.train.targets != ds.train.targets
    # New labels of flipped samples: uniform over the 4 other classes -> each shift ~1/4.
    shift = (noisy.train.targets[changed] - ds.train.targets[changed]) % 5
    freq = torch.bincount(shift, minlength=5)[1:].double() / changed.sum()
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)


def test_label_noise_on_node_split_skips_unlabelled_nodes() -> None:
    g = Graph(torch.randn(10, 2), torch.zeros(2, 0, dtype=torch.long))
    t = torch.tensor([0, 1, 2, -100, -100, 0, 1, 2, -100, 0])
    ds = Dataset(
        "n", "graph", NodeSplit(g, t), NodeSplit(g, t), NodeSplit(g, t), 3, ("a", "b", "c")
    )
    noisy = with_label_noise(ds, 0.5, seed=0)
    assert torch.equal(noisy.train.targets == IGNORE_INDEX, t == IGNORE_INDEX)
    assert int((noisy.train.targets != t).sum()) == round(0.5 * 7)


def test_label_noise_errors() -> None:
    with pytest.raises(ValueError, match=r"Invalid label-noise fraction: 1.5"):
        with_label_noise(_toy_dataset(), 1.5)


# --- text helpers -----------------------------------------------------------------------------


def test_tokenize_and_vocab_from_train_only() -> None:
    assert tokenize("It's a GREAT film, 10/10!") == ["it's", "a", "great", "film", "10", "10"]
    train = [tokenize("b a a c"), tokenize("a b d")]
    vocab = build_vocab(train, min_count=2)
    assert vocab == ("<pad>", "<unk>", "a", "b")  # by count, ties alphabetical; c, d too rare
    ids = encode([["a", "zzz", "b"], []], vocab, max_len=4)
    assert ids.tolist() == [[2, 1, 3, 0], [0, 0, 0, 0]]
    assert encode([["a"] * 9], vocab, max_len=4).tolist() == [[2, 2, 2, 2]]


# --- batching ---------------------------------------------------------------------------------


def test_batches_cover_split_and_reshuffle() -> None:
    split = TensorSplit(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    b = Batches(split, 3, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(b) == 4
    first = torch.cat([y for _, y in b])
    second = torch.cat([y for _, y in b])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    replay = Batches(split, 3, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([y for _, y in replay]), first)
    dropped = Batches(split, 3, drop_last=True)
    assert [len(y) for _, y in dropped] == [3, 3, 3]
    with pytest.raises(ValueError, match="Invalid batch_size: 0"):
        Batches(split, 0)


def test_collate_graphs_is_block_diagonal() -> None:
    g1 = Graph(torch.ones(2, 3), torch.tensor([[0, 1], [1, 0]]))
    g2 = Graph(2 * torch.ones(3, 3), torch.tensor([[0, 2], [2, 1]]))
    gb = collate_graphs([g1, g2])
    dense = torch.zeros(5, 5)
    dense[gb.edge_index[0], gb.edge_index[1]] = 1
    ref = torch.zeros(5, 5)
    ref[0, 1] = ref[1, 0] = ref[2, 4] = ref[4, 3] = 1
    assert torch.equal(dense, ref)
    assert gb.batch.tolist() == [0, 0, 1, 1, 1] and gb.num_graphs == 2
    assert torch.equal(gb.x, torch.cat([g1.x, g2.x]))


# --- the real datasets (fetched from the registries) ------------------------------------------


def load_or_skip(name: str) -> Dataset:
    try:
        return load_dataset(name)
    except DataUnavailableError as exc:
        if os.environ.get("FLATMIN_REQUIRE_DATA") == "1":
            pytest.fail(f"{name} unavailable but FLATMIN_REQUIRE_DATA=1:\n{exc}")
        pytest.skip(f"{name} unavailable: {str(exc).splitlines()[1:3]}")


def _class_counts(split) -> list[int]:
    t = split.targets
    return torch.bincount(t[t != IGNORE_INDEX]).tolist()


# name: (sizes train/val/test, num_classes, per-sample input shape, test class counts)
EXPECTED = {
    "digits": ((934, 504, 359), 10, (1, 8, 8), [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]),
    "mnist-5k": ((3500, 500, 1000), 10, (1, 28, 28), [100] * 10),
    "fashion-mnist": ((55000, 5000, 10000), 10, (1, 28, 28), [1000] * 10),
    "rotten-tomatoes": ((8966, 1280, 2562), 2, (64,), [1081, 1481]),
    "reuters-r8": ((4936, 549, 2189), 8, (128,), [696, 121, 1083, 10, 81, 87, 36, 75]),
    "20newsgroups": (
        (10166, 1127, 7528), 20, (256,),
        [319, 389, 394, 392, 385, 392, 390, 395, 398, 397, 399, 396, 393, 396, 394, 398, 364,
         376, 310, 251],
    ),
    "mutag": ((132, 18, 38), 2, None, [13, 25]),
    "drosophila": ((127, 43, 43), 4, None, [4, 20, 6, 13]),
}  # fmt: skip
SLOW = {"fashion-mnist", "20newsgroups"}


@pytest.mark.data
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in EXPECTED]
)
def test_dataset_counts_and_shapes(name: str) -> None:
    sizes, k, shape, test_counts = EXPECTED[name]
    ds = load_or_skip(name)
    assert (len(ds.train), len(ds.val), len(ds.test)) == sizes
    assert ds.num_classes == k == len(ds.class_names)
    assert _class_counts(ds.test) == test_counts
    for split in (ds.train, ds.val, ds.test):
        if isinstance(split, TensorSplit):
            assert tuple(split.inputs.shape) == (len(split), *shape)
    if ds.domain == "vision":
        # standardised with the training split's statistics
        assert abs(float(ds.train.inputs.mean())) < 1e-4
        assert abs(float(ds.train.inputs.std()) - 1) < 1e-3
    if ds.domain == "text":
        assert ds.vocab[:2] == ("<pad>", "<unk>")
        assert int(ds.train.inputs.max()) < len(ds.vocab)


@pytest.mark.data
def test_mutag_graphs_match_tu_totals() -> None:
    ds = load_or_skip("mutag")
    graphs = [g for s in (ds.train, ds.val, ds.test) for g in s.graphs]
    assert isinstance(ds.train, GraphSplit)
    assert len(graphs) == 188
    assert sum(g.num_nodes for g in graphs) == 3371  # lines of MUTAG_graph_indicator.txt
    assert sum(g.edge_index.shape[1] for g in graphs) == 7442  # lines of MUTAG_A.txt
    assert all(g.x.shape[1] == 7 and torch.all(g.x.sum(1) == 1) for g in graphs)
    assert all(int(g.edge_index.max()) < g.num_nodes for g in graphs)
    labels = torch.cat([ds.train.targets, ds.val.targets, ds.test.targets])
    assert torch.bincount(labels).tolist() == [63, 125]


@pytest.mark.data
def test_drosophila_node_splits_partition_nodes() -> None:
    ds = load_or_skip("drosophila")
    assert isinstance(ds.train, NodeSplit)
    masks = torch.stack([s.targets != IGNORE_INDEX for s in (ds.train, ds.val, ds.test)])
    assert torch.equal(masks.sum(0), torch.ones(213, dtype=torch.long))
    full = sum(torch.where(m, s.targets, 0) for m, s in zip(masks, (ds.train, ds.val, ds.test)))
    assert torch.bincount(full).tolist() == [21, 100, 29, 63]  # I, K, O, P
    assert tuple(ds.train.graph.x.shape) == (213, 426)
