"""Small CPU-friendly models for the benchmark tasks, in plain torch.

* :class:`ResNetCNN` — a BatchNorm ResNet (He et al. 2016, arXiv 1512.03385) for 8×8 / 28×28 grey
  images.
* :class:`WideResNet` — WRN-d-k (Zagoruyko & Komodakis 2016, arXiv 1605.07146), the GPU-size
  vision model (WRN-16-4: 2.7M parameters).
* :class:`BagOfEmbeddings` — mean of token embeddings + MLP (Joulin et al. 2016, arXiv 1607.01759).
* :class:`TransformerClassifier` — a pre-LN transformer encoder with masked mean pooling
  (Vaswani et al. 2017, arXiv 1706.03762).
* :class:`GraphClassifier` — GCN (Kipf & Welling 2017, arXiv 1609.02907) or GIN (Xu et al. 2019,
  arXiv 1810.00826) layers with a per-layer pooled readout.
* :class:`NodeGCN` — a GCN that returns one logit vector per node.

No model uses dropout: torch's dropout draws from the global RNG, and flatmin keeps every random
draw on an explicit generator (parameters are initialised under ``torch.random.fork_rng``).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

from flatmin.data.batching import GraphBatch

__all__ = [
    "BagOfEmbeddings",
    "GCNConv",
    "GINConv",
    "GraphClassifier",
    "NodeGCN",
    "ResNetCNN",
    "TransformerClassifier",
    "WideResNet",
]


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCNN(nn.Module):
    """BatchNorm ResNet: stem conv → stages of basic blocks (width doubles, stride 2) → pool → FC.

    Args:
        num_classes: output logits.
        in_channels: image channels.
        width: channels of the first stage.
        blocks: basic blocks per stage.
        stem_stride: stride of the stem convolution (2 for 28×28 inputs halves the cost).
        stem_pool: a 2×2 max-pool after the stem (as ResNet's stem on ImageNet): with
            ``stem_stride=2`` a 28×28 image enters the first stage at 7×7, a quarter of the cost.
    """

    def __init__(
        self, num_classes: int, *, in_channels: int = 1, width: int = 16,
        blocks: tuple[int, ...] = (1, 1), stem_stride: int = 1, stem_pool: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        stem: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        if stem_pool:
            stem.append(nn.MaxPool2d(2))
        self.stem = nn.Sequential(*stem)
        layers: list[nn.Module] = []
        c = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                layers.append(_BasicBlock(c, c_out, 2 if (i > 0 and j == 0) else 1))
                c = c_out
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` images to ``(N, num_classes)`` logits."""
        h = self.stages(self.stem(x))
        return self.fc(h.mean(dim=(2, 3)))


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3×3, BN-ReLU-conv3×3, plus the shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        # A 1×1 projection where the shape changes (applied to the pre-activated input, as in
        # the authors' code); the identity otherwise.
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-``depth``-``width``: three groups of ``(depth − 4) / 6`` pre-activation blocks.

    Stem conv (16 channels) → groups of widths ``16k, 32k, 64k`` (stride 1, 2, 2) → BN-ReLU →
    global average pool → FC. No dropout (see the module docstring); convolutions are
    initialised with He-normal (fan-out) weights as in the reference implementation.

    Args:
        num_classes: output logits.
        depth: total depth ``6n + 4`` (16, 22, 28, 40).
        width: widening factor ``k``.
        in_channels: image channels.

    Raises:
        ValueError: ``depth`` is not ``6n + 4`` with ``n >= 1``, or ``width < 1``.

    Example:
        >>> net = WideResNet(10, depth=16, width=4)
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, num_classes: int, *, depth: int = 16, width: int = 4, in_channels: int = 1
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Invalid depth: {depth} (expected 6n + 4 with n >= 1: 10, 16, 22...)")
        if width < 1:
            raise ValueError(f"Invalid width: {width} (expected >= 1)")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        c = 16
        for i, c_out in enumerate((16 * width, 32 * width, 64 * width)):
            for j in range(n):
                blocks.append(_WideBlock(c, c_out, 2 if (i > 0 and j == 0) else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` images to ``(N, num_classes)`` logits."""
        h = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.unsqueeze(-1).to(h.dtype)
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


class BagOfEmbeddings(nn.Module):
    """Mean of the non-padding token embeddings, then a one-hidden-layer MLP.

    Args:
        vocab_size: number of token ids (id 0 is padding).
        num_classes: output logits.
        dim: embedding width.
        hidden: MLP hidden width.
    """

    def __init__(self, vocab_size: int, num_classes: int, *, dim: int = 64, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map ``(N, L)`` token ids to ``(N, num_classes)`` logits."""
        return self.mlp(_masked_mean(self.embed(tokens), tokens != 0))


class TransformerClassifier(nn.Module):
    """Pre-LN transformer encoder over token + learned position embeddings, masked mean pooling.

    Args:
        vocab_size: number of token ids (id 0 is padding, masked out of attention and pooling).
        num_classes: output logits.
        max_len: longest sequence (size of the position table).
        dim: model width.
        heads: attention heads.
        layers: encoder layers.
        ff: feed-forward width.
    """

    def __init__(
        self, vocab_size: int, num_classes: int, *, max_len: int, dim: int = 64, heads: int = 4,
        layers: int = 2, ff: int = 128,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, ff, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map ``(N, L)`` token ids to ``(N, num_classes)`` logits."""
        keep = tokens != 0
        keep[:, 0] = True  # an all-padding (empty) document would make attention NaN
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.encoder(h, src_key_padding_mask=~keep)
        return self.fc(self.norm(_masked_mean(h, keep)))


def _gcn_norm(edge_index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loops = torch.arange(n, device=edge_index.device)
    src = torch.cat([edge_index[0], loops])
    dst = torch.cat([edge_index[1], loops])
    deg = torch.bincount(dst, minlength=n).to(torch.get_default_dtype())
    inv = deg.pow(-0.5)
    return src, dst, inv[src] * inv[dst]


class GCNConv(nn.Module):
    """Graph convolution ``H' = D^{-1/2} (A + I) D^{-1/2} H W + b`` (Kipf & Welling 2017)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c_in, c_out, bias=False)
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Propagate node features ``(n, c_in)`` → ``(n, c_out)``."""
        src, dst, w = _gcn_norm(edge_index, x.shape[0])
        h = self.lin(x)
        out = torch.zeros_like(h).index_add_(0, dst, h[src] * w.unsqueeze(-1).to(h.dtype))
        return out + self.bias


class GINConv(nn.Module):
    """GIN layer ``h' = MLP((1 + ε) h + Σ_{j ∈ N(i)} h_j)`` with learnable ε (Xu et al. 2019)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.eps = nn.Parameter(torch.zeros(()))
        self.mlp = nn.Sequential(
            nn.Linear(c_in, c_out), nn.BatchNorm1d(c_out), nn.ReLU(), nn.Linear(c_out, c_out)
        )

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Propagate node features ``(n, c_in)`` → ``(n, c_out)``."""
        agg = torch.zeros_like(x).index_add_(0, edge_index[1], x[edge_index[0]])
        return self.mlp((1 + self.eps) * x + agg)


_CONVS: dict[str, type[GCNConv] | type[GINConv]] = {"gcn": GCNConv, "gin": GINConv}


class GraphClassifier(nn.Module):
    """Stacked GCN/GIN layers (BatchNorm + ReLU after each) and a readout over all layers.

    The readout concatenates each layer's pooled node states (sum pooling for GIN, as in Xu et
    al.; mean pooling for GCN) and maps them to logits with a linear layer.

    Args:
        in_features: node-feature width.
        num_classes: output logits.
        conv: ``"gcn"`` or ``"gin"``.
        hidden: hidden width.
        layers: message-passing layers.
    """

    def __init__(
        self, in_features: int, num_classes: int, *, conv: str = "gin", hidden: int = 64,
        layers: int = 3,
    ) -> None:  # fmt: skip
        super().__init__()
        if conv not in _CONVS:
            raise ValueError(f"Invalid conv: {conv!r} (expected one of {sorted(_CONVS)})")
        self.pool = "sum" if conv == "gin" else "mean"
        dims = [in_features] + [hidden] * layers
        self.convs = nn.ModuleList(_CONVS[conv](a, b) for a, b in itertools.pairwise(dims))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers))
        self.fc = nn.Linear(hidden * layers, num_classes)

    def forward(self, g: GraphBatch) -> torch.Tensor:
        """Map a :class:`GraphBatch` to ``(num_graphs, num_classes)`` logits."""
        h = g.x
        pooled = []
        count = torch.bincount(g.batch, minlength=g.num_graphs).clamp_min(1).unsqueeze(-1)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = F.relu(norm(conv(h, g.edge_index)))
            s = h.new_zeros(g.num_graphs, h.shape[1]).index_add_(0, g.batch, h)
            pooled.append(s if self.pool == "sum" else s / count)
        return self.fc(torch.cat(pooled, dim=1))


class NodeGCN(nn.Module):
    """Two-layer-by-default GCN for node classification: ``(n, f)`` → ``(n, num_classes)``.

    Args:
        in_features: node-feature width.
        num_classes: output logits per node.
        hidden: hidden width.
        layers: GCN layers (the last one outputs the logits).
    """

    def __init__(self, in_features: int, num_classes: int, *, hidden: int = 64, layers: int = 2):
        super().__init__()
        dims = [in_features] + [hidden] * (layers - 1) + [num_classes]
        self.convs = nn.ModuleList(GCNConv(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, g: GraphBatch) -> torch.Tensor:
        """Return per-node logits for the graph in ``g``."""
        h = g.x
        for i, conv in enumerate(self.convs):
            h = conv(h, g.edge_index)
            if i < len(self.convs) - 1:
                h = F.relu(h)
        return h
