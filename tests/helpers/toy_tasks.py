"""Tiny synthetic tasks for the benchmark tests (imported by tests, subprocesses and workers).

``ToyResolver`` serves tasks on a 3-class Gaussian-cluster dataset with a BatchNorm MLP, so a run
takes a fraction of a second and every method (SWA's BN recomputation included) is exercised.
``toy-nan`` has a model whose output is NaN: its runs must end ``failed``.
``DyingResolver`` kills the first worker that uses it; ``_descendants``/``_all_gone`` watch the
processes a grid leaves behind (Linux /proc).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from flatmin.bench import BenchConfig
from flatmin.data import Dataset, Graph, GraphSplit, TensorSplit
from flatmin.tasks import Recipe, Task
from flatmin.tasks.models import GraphClassifier


def toy_dataset(seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=gen) * 1.5

    def split(n: int) -> TensorSplit:
        y = torch.arange(n) % 3
        x = centers[y] + torch.randn(n, 8, generator=gen)
        return TensorSplit(x, y)

    return Dataset(
        name="toy", domain="vision", train=split(96), val=split(48), test=split(60),
        num_classes=3, class_names=("a", "b", "c"),
    )  # fmt: skip


def toy_graphs(n: int, seed: int) -> GraphSplit:
    """Random undirected graphs with 3-d node features; label 1 iff the graph has > 5 nodes."""
    gen = torch.Generator().manual_seed(seed)
    graphs, labels = [], []
    for _ in range(n):
        k = int(torch.randint(3, 9, (1,), generator=gen))
        src = torch.randint(0, k, (2 * k,), generator=gen)
        dst = torch.randint(0, k, (2 * k,), generator=gen)
        edges = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], 1)
        graphs.append(Graph(torch.randn(k, 3, generator=gen), edges))
        labels.append(int(k > 5))
    return GraphSplit(tuple(graphs), torch.tensor(labels))


def toy_graph_dataset() -> Dataset:
    return Dataset(
        name="toy-graphs", domain="graph", train=toy_graphs(48, 1), val=toy_graphs(16, 2),
        test=toy_graphs(16, 3), num_classes=2, class_names=("small", "large"),
    )  # fmt: skip


class _NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * float("nan")


def _mlp(ds: Dataset) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _nan(ds: Dataset) -> nn.Module:
    return _NaNNet()


def _gin(ds: Dataset) -> nn.Module:
    return GraphClassifier(3, 2, conv="gin", hidden=8, layers=2)


RECIPE = Recipe("sgd", lr=0.1, weight_decay=1e-4, batch_size=16, epochs=4)
TASKS = {
    "toy-a": Task("toy-a", "vision", "toy", "MLP-BN", _mlp, quick=RECIPE, full=RECIPE),
    "toy-b": Task(
        "toy-b",
        "graph",
        "toy",
        "MLP-BN",
        _mlp,
        quick=Recipe("adamw", lr=0.01, weight_decay=0.0, batch_size=32, epochs=4),
        full=RECIPE,
    ),
    "toy-nan": Task("toy-nan", "text", "toy", "NaN-net", _nan, quick=RECIPE, full=RECIPE),
    "toy-graph": Task(
        "toy-graph",
        "graph",
        "toy-graphs",
        "GIN-2x8",
        _gin,
        quick=Recipe("adamw", lr=0.01, weight_decay=0.0, batch_size=8, epochs=2),
        full=RECIPE,
    ),
}


class ToyResolver:
    """Resolver of the toy tasks; ``TOY_SLEEP`` seconds of delay per run (for the kill test)."""

    def task(self, name: str) -> Task:
        base, _, factor = name.rpartition("-x")  # budget variants, as get_task resolves them
        if base in TASKS and factor:
            return TASKS[base].with_budget(float(factor))
        if name not in TASKS:
            raise ValueError(f"Unknown task: {name!r} (known: {', '.join(TASKS)})")
        return TASKS[name]

    def dataset(self, task: Task) -> Dataset:
        delay = float(os.environ.get("TOY_SLEEP", "0"))
        if delay:
            time.sleep(delay)
        return toy_graph_dataset() if task.dataset == "toy-graphs" else toy_dataset()


class DyingResolver(ToyResolver):
    """The first run that calls ``hook`` outside this process kills its own process (an OOM kill,
    a crash): ``"dataset"`` for a pool worker (test_faults), ``"task"`` for a Ray worker
    (test_bench_ray). The ``marker`` file, created exclusively, makes it only the first one.
    """

    def __init__(self, marker: Path, hook: Literal["task", "dataset"]) -> None:
        if hook not in ("task", "dataset"):
            raise ValueError(f"hook: {hook!r} (expected 'task' or 'dataset')")
        self.parent, self.marker, self.hook = os.getpid(), marker, hook  # pickled into workers

    def _maybe_die(self, hook: str) -> None:
        if hook != self.hook or os.getpid() == self.parent:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))  # only the first one
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    def task(self, name: str) -> Task:
        self._maybe_die("task")
        return super().task(name)

    def dataset(self, task: Task) -> Dataset:
        self._maybe_die("dataset")
        return super().dataset(task)


# -- processes (Linux /proc) -----------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie is dead (an init that does not reap keeps it)


def _all_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def toy_config(out: Path, **kw) -> BenchConfig:
    """A grid of toy-a x baseline/SAM x seed 0 in ``out`` (``kw`` overrides)."""
    base = dict(out=out, tasks=("toy-a",), methods=("baseline", "sam"), seeds=(0,),
                progress=False)  # fmt: skip
    base.update(kw)
    return BenchConfig(**base)


def start_bench(argv: list[str], out: Path, timeout: float) -> subprocess.Popen[str]:
    """``flatmin ARGV --out OUT`` in its own session, returned once its first record is written.

    The caller stops it (a signal) and must kill it in a ``finally`` if it is still running.
    """
    exe = Path(sys.executable).with_name("flatmin")
    proc = subprocess.Popen([str(exe), *argv, "--out", str(out)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    results = out / "results.jsonl"
    deadline = time.monotonic() + timeout
    try:
        while not results.exists() or not results.read_text():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc
