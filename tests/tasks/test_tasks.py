"""Tests of flatmin.tasks: models vs dense references, recipes, registry, one-epoch runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from flatmin.cli import main
from flatmin.data import IGNORE_INDEX, NodeSplit
from flatmin.data.batching import Batches, GraphBatch, collate_graphs
from flatmin.data.splits import Graph
from flatmin.tasks import Recipe, correct_fn, get_task, list_tasks, loss_fn
from flatmin.tasks.models import (
    BagOfEmbeddings,
    GCNConv,
    GINConv,
    GraphClassifier,
    NodeGCN,
    ResNetCNN,
    TransformerClassifier,
)


def _random_graph(n: int, p: float, gen: torch.Generator) -> Graph:
    a = torch.rand(n, n, generator=gen) < p
    a = torch.triu(a, 1)
    a = a | a.T
    return Graph(torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.nonzero(a).T)


# --- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("side", "stride"), [(8, 1), (28, 2)])
def test_resnet_output_shape(side: int, stride: int) -> None:
    model = ResNetCNN(10, stem_stride=stride)
    assert model(torch.randn(5, 1, side, side)).shape == (5, 10)


def test_gcn_conv_equals_dense_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    g = _random_graph(7, 0.4, gen)
    conv = GCNConv(4, 3).double()
    with torch.no_grad():
        conv.bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    a = torch.zeros(7, 7, dtype=torch.float64)
    a[g.edge_index[0], g.edge_index[1]] = 1
    a_hat = a + torch.eye(7, dtype=torch.float64)
    d = torch.diag(a_hat.sum(1).pow(-0.5))
    ref = d @ a_hat @ d @ g.x @ conv.lin.weight.T + conv.bias
    torch.testing.assert_close(conv(g.x, g.edge_index), ref)


def test_gin_conv_equals_dense_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    g = _random_graph(6, 0.5, gen)
    conv = GINConv(4, 5).double().eval()
    with torch.no_grad():
        conv.eps.fill_(0.3)
    a = torch.zeros(6, 6, dtype=torch.float64)
    a[g.edge_index[1], g.edge_index[0]] = 1
    ref = conv.mlp(1.3 * g.x + a @ g.x)
    torch.testing.assert_close(conv(g.x, g.edge_index), ref)


@pytest.mark.parametrize("conv", ["gcn", "gin"])
def test_graph_classifier_is_per_graph(conv: str) -> None:
    gen = torch.Generator().manual_seed(2)
    graphs = [_random_graph(n, 0.4, gen) for n in (3, 6, 4)]
    model = GraphClassifier(4, 2, conv=conv, hidden=8).double().eval()
    batched = model(collate_graphs(graphs))
    assert batched.shape == (3, 2)
    # Each graph's logits equal those of the graph alone: no leakage across the batch.
    for i, g in enumerate(graphs):
        torch.testing.assert_close(batched[i], model(collate_graphs([g]))[0])


def test_graph_classifier_rejects_unknown_conv() -> None:
    with pytest.raises(ValueError, match="Invalid conv: 'gat'"):
        GraphClassifier(4, 2, conv="gat")


def test_node_gcn_shape() -> None:
    g = _random_graph(9, 0.3, torch.Generator().manual_seed(3))
    gb = GraphBatch(g.x.float(), g.edge_index, torch.zeros(9, dtype=torch.long), 1)
    assert NodeGCN(4, 3)(gb).shape == (9, 3)


def test_bag_of_embeddings_is_mean_of_non_padding() -> None:
    model = BagOfEmbeddings(20, 3, dim=4).double()
    tokens = torch.tensor([[5, 7, 0, 0], [3, 0, 0, 0]])
    emb = model.embed.weight
    ref = torch.stack([(emb[5] + emb[7]) / 2, emb[3]])
    torch.testing.assert_close(model(tokens), model.mlp(ref))


def test_transformer_ignores_padding() -> None:
    torch.manual_seed(0)
    model = TransformerClassifier(50, 4, max_len=12).double().eval()
    tokens = torch.tensor([[4, 9, 11, 0, 0, 0]])
    longer = torch.tensor([[4, 9, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    out = model(tokens)
    assert out.shape == (1, 4)
    torch.testing.assert_close(out, model(longer))
    assert torch.isfinite(model(torch.zeros(2, 6, dtype=torch.long))).all()  # empty documents


def test_loss_and_correct_ignore_unlabelled_nodes() -> None:
    out = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    t = torch.tensor([0, 0, IGNORE_INDEX])
    torch.testing.assert_close(loss_fn(out, t), F.cross_entropy(out[:2], t[:2]))
    assert correct_fn(out, t) == (1, 2)


# --- recipes and registry ------------------------------------------------------------------------


def test_cosine_schedule_closed_form() -> None:
    r = Recipe("sgd", lr=0.1, weight_decay=0.0, batch_size=8, epochs=4, warmup_epochs=1)
    spe = 5  # steps per epoch
    assert [r.lr_factor(s, spe) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    for s in range(5, 20):
        assert math.isclose(r.lr_factor(s, spe), 0.5 * (1 + math.cos(math.pi * (s - 5) / 15)))
    const = Recipe("sgd", lr=0.1, weight_decay=0.0, batch_size=8, epochs=4, schedule="constant")
    assert {const.lr_factor(s, spe) for s in range(20)} == {1.0}
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], **r.optimizer_kwargs())
    sched = r.make_scheduler(opt, spe)
    opt.step()
    sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.1 * r.lr_factor(1, spe))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "lbfgs"}, "Invalid optimizer: 'lbfgs'"),
        ({"schedule": "step"}, "Invalid schedule: 'step'"),
        ({"lr": -1.0}, "Invalid recipe: lr=-1.0"),
        ({"epochs": 0}, "Invalid recipe: .*epochs=0"),
    ],
)
def test_recipe_errors(kwargs: dict, match: str) -> None:
    base = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "batch_size": 8, "epochs": 1}
    with pytest.raises(ValueError, match=match):
        Recipe(**{**base, **kwargs})


def test_registry_names_and_noisy_variants() -> None:
    names = list_tasks()
    assert {"digits", "rotten-tomatoes", "mutag", "drosophila", "digits-noisy40"} <= set(names)
    assert {get_task(n).domain for n in names} == {"vision", "text", "graph"}
    noisy = get_task("fashion-mnist-noisy25")
    assert noisy.label_noise == 0.25 and noisy.dataset == "fashion-mnist"
    assert get_task("digits-noisy40").recipe("full") == get_task("digits").noisy_full
    assert get_task("digits").recipe("quick") == get_task("digits-noisy40").recipe("quick")
    with pytest.raises(ValueError, match=r"Unknown task: 'cifar10'.*digits.*mutag"):
        get_task("cifar10")
    with pytest.raises(ValueError, match="Invalid budget: 'medium'"):
        get_task("digits").recipe("medium")


def test_cli_tasks_and_bad_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "mutag" in out
    assert main(["data", "verify", "imagenet"]) == 2
    assert "Unknown dataset: 'imagenet'" in capsys.readouterr().err


def test_cli_data_list_on_empty_cache(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "--cache-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist" in out and "missing" in out


from helpers.data import load_or_skip  # noqa: E402

# --- tasks on real data ---------------------------------------------------------------------------


def _full_batch_loss(model, data, batches) -> float:
    # Train mode (batch statistics) so BatchNorm running averages do not blur the comparison.
    model.train()
    with torch.no_grad():
        losses = [
            (float(data.loss_fn(model(x), y)), int((y != IGNORE_INDEX).sum())) for x, y in batches
        ]
    return sum(v * n for v, n in losses) / sum(n for _, n in losses)


SLOW_TASKS = {
    "20newsgroups",
    "fashion-mnist",
    "rotten-tomatoes-transformer",
    "reuters-r8-transformer",
}


@pytest.mark.data
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_TASKS else [])
        for n in list_tasks(include_noisy=False)
    ],
)
def test_task_trains_one_epoch_on_subset(name: str) -> None:
    data = load_or_skip(name)
    split = data.dataset.train
    bs = data.recipe.batch_size
    if isinstance(split, NodeSplit):
        train = eval_ = data.train
        passes = 10  # one full-graph step per epoch: take ten
    else:
        subset = torch.arange(min(len(split), 8 * bs))
        train = Batches(
            split,
            bs,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
            drop_last=True,
            indices=subset,
        )
        eval_ = Batches(split, 512, indices=subset)
        passes = max(1, math.ceil(8 / len(train)))  # at least 8 optimizer steps
    model = data.make_model()
    x0, _ = next(iter(eval_))
    out = model(x0)
    n0 = x0.num_graphs if isinstance(x0, GraphBatch) else len(x0)
    if isinstance(split, NodeSplit):
        n0 = x0.x.shape[0]
    assert out.shape == (n0, data.num_classes)
    before = _full_batch_loss(model, data, eval_)
    opt = data.recipe.optimizer_class(model.parameters(), **data.recipe.optimizer_kwargs())
    for _ in range(passes):
        model.train()
        for x, y in train:
            opt.zero_grad()
            data.loss_fn(model(x), y).backward()
            opt.step()
    after = _full_batch_loss(model, data, eval_)
    assert after < before, (before, after)


@pytest.mark.data
def test_noisy_task_flips_train_only() -> None:
    clean = load_or_skip("digits")
    noisy = load_or_skip("digits-noisy40")
    changed = noisy.dataset.train.targets != clean.dataset.train.targets
    assert int(changed.sum()) == round(0.4 * 934)
    assert torch.equal(noisy.dataset.train.clean_targets, clean.dataset.train.targets)
    for a, b in ((noisy.dataset.val, clean.dataset.val), (noisy.dataset.test, clean.dataset.test)):
        assert torch.equal(a.targets, b.targets) and torch.equal(a.inputs, b.inputs)


@pytest.mark.data
def test_make_model_is_seeded_and_leaves_global_rng_alone() -> None:
    data = load_or_skip("mutag")
    state = torch.random.get_rng_state()
    a, b, c = data.make_model(), data.make_model(), data.make_model(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.data
@pytest.mark.slow
def test_train_subset_and_batch_order_are_reproducible() -> None:
    d1 = load_or_skip("fashion-mnist", seed=3)
    d2 = load_or_skip("fashion-mnist", seed=3)
    assert len(d1.dataset.train) == d1.recipe.train_subset
    assert torch.bincount(d1.dataset.train.targets).tolist() == [d1.recipe.train_subset // 10] * 10
    y1 = next(iter(d1.train))[1]
    assert torch.equal(y1, next(iter(d2.train))[1])
    assert not torch.equal(y1, next(iter(load_or_skip("fashion-mnist", seed=4).train))[1])
