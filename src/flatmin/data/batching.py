"""Re-iterable mini-batch streams of ``(inputs, targets)`` over a split, in plain torch.

* :class:`TensorSplit` → ``inputs`` is a slice of the stacked tensor.
* :class:`GraphSplit` → ``inputs`` is a :class:`GraphBatch`: the graphs of the batch merged into
  one disjoint graph (node features concatenated, edge indices offset) plus ``batch`` (graph id of
  each node), so a GNN pools nodes per graph with ``index_add_``.
* :class:`NodeSplit` → one batch per pass: the whole graph, and ``targets`` that are ``-100`` on
  nodes outside the split (use ``ignore_index=-100``).

Shuffling uses an explicit ``torch.Generator`` owned by the stream: each pass draws the next
permutation, so a stream built with the same seed replays the same sequence of epochs.

Accelerators: a stream with ``device`` yields its batches there. Splits already on that device
(:meth:`flatmin.tasks.TaskData.to` moves small datasets once) are sliced in place — the pass's
order is moved once per pass, never per batch; graph batches are merged on the host and copied.

Several processes (``shard=(rank, world)``): every process draws the same permutation and forms
the same global batches as an unsharded stream; each yields the ``rank``-th strided slice of
every batch (``batch[rank::world]``, the assignment of ``torch.utils.data.DistributedSampler``),
so the ``world`` shards of a step are exactly the unsharded batch.

Augmentation (``augment``, a training stream's): each pass seeds a fresh generator with a number
drawn from the stream's own ``generator`` after the permutation, and draws every batch's crops
and flips from it. The augmented batches are thus fixed by the stream's seed alone (the same for
every method, and restored with the generator's state on a resume), and every process of a
sharded stream draws for the whole batch, then augments its own slice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from flatmin.data.augment import CropFlip
from flatmin.data.splits import Graph, GraphSplit, NodeSplit, Split, TensorSplit

__all__ = ["Batches", "GraphBatch", "collate_graphs"]


@dataclass(frozen=True)
class GraphBatch:
    """Several graphs merged into one disjoint graph.

    Attributes:
        x: node features ``(total_nodes, f)``.
        edge_index: ``(2, total_edges)`` long, offset into the merged node numbering.
        batch: ``(total_nodes,)`` long, the graph of each node (``0 .. num_graphs - 1``).
        num_graphs: number of graphs.
    """

    x: torch.Tensor
    edge_index: torch.Tensor
    batch: torch.Tensor
    num_graphs: int

    def to(self, device: torch.device | str) -> GraphBatch:
        """Move every tensor to ``device``."""
        return GraphBatch(
            self.x.to(device), self.edge_index.to(device), self.batch.to(device), self.num_graphs
        )


def collate_graphs(graphs: Sequence[Graph]) -> GraphBatch:
    """Merge ``graphs`` into one :class:`GraphBatch`."""
    sizes = torch.tensor([g.num_nodes for g in graphs])
    offsets = torch.cumsum(sizes, 0) - sizes
    edges = torch.cat([g.edge_index + o for g, o in zip(graphs, offsets.tolist(), strict=True)], 1)
    batch = torch.repeat_interleave(torch.arange(len(graphs)), sizes)
    return GraphBatch(torch.cat([g.x for g in graphs]), edges, batch, len(graphs))


class Batches:
    """A re-iterable stream of ``(inputs, targets)`` mini-batches over one split.

    Args:
        split: the split to iterate.
        batch_size: samples per batch (ignored for a :class:`NodeSplit`: one full-graph batch).
        shuffle: draw a new permutation from ``generator`` on every pass.
        generator: source of the permutations (required when ``shuffle``).
        drop_last: drop a final incomplete batch (keeps BatchNorm away from tiny batches).
        indices: optional subset of sample indices to iterate (e.g. a quick-budget subset).
        device: move each batch there (``None``: leave the tensors where they are).
        shard: ``(rank, world)``: yield only this process's share of every batch (see the module
            docstring); ``batch_size`` stays the global batch size and must be a multiple of
            ``world``.
        augment: crop and flip the images of every batch (a training stream's option; needs a
            :class:`TensorSplit` of ``(N, C, H, W)`` images and a ``generator``).

    Raises:
        ValueError: a bad ``batch_size`` or ``shard``, a shard of a node-classification split, or
            ``augment`` on inputs that are not images or without a generator.
    """

    def __init__(
        self, split: Split, batch_size: int, *, shuffle: bool = False,
        generator: torch.Generator | None = None, drop_last: bool = False,
        indices: torch.Tensor | None = None, device: torch.device | str | None = None,
        shard: tuple[int, int] | None = None, augment: CropFlip | None = None,
    ) -> None:  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected >= 1)")
        if shuffle and generator is None:
            raise ValueError("Invalid generator: None (shuffle=True needs a torch.Generator)")
        if indices is not None and isinstance(split, NodeSplit):
            raise TypeError("Invalid indices for a NodeSplit (subset its targets instead)")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        n = len(split) if not isinstance(split, NodeSplit) else 1
        self.indices = torch.arange(n) if indices is None else indices
        self.device = None if device is None else torch.device(device)
        self.shard = shard
        if shard is not None:
            self._check_shard(shard)
        self.augment = augment
        if augment is not None:
            self._check_augment(augment)

    def _check_augment(self, augment: CropFlip) -> None:
        if not isinstance(augment, CropFlip):
            raise TypeError(f"Invalid augment: {augment!r} (expected a CropFlip or None)")
        if self.generator is None:
            raise ValueError("Invalid generator: None (augment needs a torch.Generator)")
        inputs = getattr(self.split, "inputs", None)
        if not isinstance(self.split, TensorSplit) or inputs is None or inputs.dim() != 4:
            shape = None if inputs is None else tuple(inputs.shape)
            raise ValueError(
                f"Invalid augment for {type(self.split).__name__} inputs of shape {shape} "
                "(expected images (N, C, H, W))"
            )

    def _check_shard(self, shard: tuple[int, int]) -> None:
        rank, world = shard
        if not (isinstance(world, int) and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"Invalid shard: {shard} (expected (rank, world), 0 <= rank < world)")
        if isinstance(self.split, NodeSplit):
            raise ValueError(
                "Invalid shard: a node-classification split is one graph (one batch per pass); "
                "it cannot be divided between processes"
            )
        sizes = {self.batch_size} if len(self) > 0 else set()
        tail = self.indices.numel() % self.batch_size
        if tail and not self.drop_last:
            sizes.add(tail)
        uneven = sorted(b for b in sizes if b % world)
        if uneven:
            raise ValueError(
                f"Invalid shard: {world} processes cannot share batches of {uneven[0]} samples "
                "equally (the mean of the shards' losses must be the batch's mean loss)"
            )

    def sharded(self, rank: int, world: int) -> Batches:
        """The same stream (same generator object, same order) yielding only shard ``rank``."""
        return Batches(
            self.split, self.batch_size, shuffle=self.shuffle, generator=self.generator,
            drop_last=self.drop_last, indices=self.indices, device=self.device,
            shard=(rank, world), augment=self.augment,
        )  # fmt: skip

    @property
    def num_samples(self) -> int:
        """Labelled samples per pass (nodes for a :class:`NodeSplit`)."""
        return len(self.split) if isinstance(self.split, NodeSplit) else self.indices.numel()

    def __len__(self) -> int:
        if isinstance(self.split, NodeSplit):
            return 1
        n = self.indices.numel()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | GraphBatch, torch.Tensor]]:
        if self.device is None:
            yield from self._batches()
            return
        for inputs, targets in self._batches():
            yield inputs.to(self.device), targets.to(self.device)

    def _batches(self) -> Iterator[tuple[torch.Tensor | GraphBatch, torch.Tensor]]:
        split = self.split
        if isinstance(split, NodeSplit):
            g = split.graph
            n = g.num_nodes
            batch = torch.zeros(n, dtype=torch.long, device=g.x.device)
            yield GraphBatch(g.x, g.edge_index, batch, 1), split.targets
            return
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=self.generator)]
        if isinstance(split, TensorSplit) and split.targets.device != order.device:
            order = order.to(split.targets.device)  # once per pass, not once per batch
        if self.augment is not None:
            yield from self._augmented(split, order)  # type: ignore[arg-type]
            return
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.shard is not None:
                idx = idx[self.shard[0] :: self.shard[1]]
            if isinstance(split, TensorSplit):
                yield split.inputs[idx], split.targets[idx]
            elif isinstance(split, GraphSplit):
                targets = split.targets[idx.to(split.targets.device)]
                yield collate_graphs([split.graphs[i] for i in idx.tolist()]), targets
            else:  # pragma: no cover - Split is a closed union
                raise TypeError(f"Invalid split type: {type(split).__name__}")

    def _augmented(
        self, split: TensorSplit, order: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one pass in ``order``, augmented (see the module docstring)."""
        assert self.augment is not None and self.generator is not None  # checked in __init__
        seed = int(torch.randint(2**62, (), generator=self.generator))
        draws_gen = torch.Generator().manual_seed(seed)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            draws = self.augment.draw(idx.numel(), draws_gen)
            if self.shard is not None:
                rank, world = self.shard
                idx = idx[rank::world]
                draws = tuple(d[rank::world] for d in draws)  # type: ignore[assignment]
            yield self.augment.apply(split.inputs[idx], draws), split.targets[idx]
