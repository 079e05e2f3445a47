"""Graph datasets: MUTAG (graph classification) and the Drosophila connectome (node classification).

Graphs are plain tensors (no PyG/DGL): node features ``x`` and a directed ``edge_index`` that lists
each undirected edge in both directions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flatmin.data.splits import (
    IGNORE_INDEX,
    Dataset,
    Graph,
    GraphSplit,
    NodeSplit,
    stratified_indices,
)

SPLIT_SEED = 0
MUTAG_ATOMS = ("C", "N", "O", "F", "I", "Cl", "Br")
DROSOPHILA_CELLS = ("I", "K", "O", "P")


def _ints(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=1)


def load_mutag(paths: dict[str, Path]) -> Dataset:
    """MUTAG (TU format, from the grakel wheel): 188 molecules, mutagenic (1) or not (0).

    Node features are one-hot atom types (7: C, N, O, F, I, Cl, Br); ``edge_index`` holds the
    bonds in both directions (edge labels are not used). Stratified 70/10/20 split with seed 0.
    """
    edges = _ints(paths["MUTAG_A.txt"]).reshape(-1, 2) - 1
    graph_of = _ints(paths["MUTAG_graph_indicator.txt"]) - 1
    node_label = _ints(paths["MUTAG_node_labels.txt"])
    labels = torch.from_numpy((_ints(paths["MUTAG_graph_labels.txt"]) > 0).astype(np.int64))
    x_all = torch.nn.functional.one_hot(torch.from_numpy(node_label), len(MUTAG_ATOMS)).float()
    first = np.searchsorted(graph_of, np.arange(len(labels)))
    last = np.append(first[1:], len(graph_of))
    edge_graph = graph_of[edges[:, 0]]
    graphs = []
    for g in range(len(labels)):
        e = torch.from_numpy(edges[edge_graph == g].T - first[g]).contiguous()
        graphs.append(Graph(x_all[first[g] : last[g]], e))
    parts = stratified_indices(labels, (0.7, 0.1, 0.2), seed=SPLIT_SEED)
    splits = [GraphSplit(tuple(graphs[i] for i in p.tolist()), labels[p]) for p in parts]
    return Dataset(
        "mutag", "graph", splits[0], splits[1], splits[2], 2, ("non-mutagenic", "mutagenic")
    )


def load_drosophila(paths: dict[str, Path]) -> Dataset:
    """Right hemisphere of the Drosophila larva mushroom-body connectome (graspologic).

    213 neurons of 4 cell types (I: 21, K: 100, O: 29, P: 63; Eichler et al. 2017). The weighted
    directed adjacency ``A`` (synapse counts) gives the node features ``[log1p(A), log1p(Aᵀ)]``
    (426 values: out- and in-connection strengths) and the propagation graph: an edge ``i — j``
    wherever ``A[i, j] + A[j, i] > 0``, both directions. Node split: stratified 60/20/20 with seed
    0; each split's ``targets`` is ``-100`` on the other splits' nodes.
    """
    adj = np.loadtxt(paths["right_adjacency.csv"], dtype=np.float32)
    names = paths["right_cell_labels.csv"].read_text().split()
    y = torch.tensor([DROSOPHILA_CELLS.index(c) for c in names], dtype=torch.long)
    a = torch.from_numpy(adj)
    x = torch.cat([torch.log1p(a), torch.log1p(a.T)], dim=1)
    sym = (a + a.T) > 0
    sym.fill_diagonal_(False)
    edge_index = torch.nonzero(sym).T.contiguous()
    graph = Graph(x, edge_index)
    parts = stratified_indices(y, (0.6, 0.2, 0.2), seed=SPLIT_SEED)
    splits = []
    for p in parts:
        t = torch.full_like(y, IGNORE_INDEX)
        t[p] = y[p]
        splits.append(NodeSplit(graph, t))
    return Dataset("drosophila", "graph", splits[0], splits[1], splits[2], 4, DROSOPHILA_CELLS)
