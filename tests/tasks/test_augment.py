"""Train-time augmentation: CropFlip against a hand-written reference, the training stream only,
seeded by the run seed; the run hash names it only when set (the built-in runs keep their hashes:
tests/test_task_protocol.py checks every committed record)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from flatmin.bench import Hyper, RunSpec, train
from flatmin.data import Dataset, TensorSplit
from flatmin.data.augment import CropFlip
from flatmin.data.batching import Batches
from flatmin.tasks import Recipe, Task, get_task
from flatmin.tasks.models import ResNetCNN


def _reference(images: np.ndarray, rows, cols, flips, padding: int) -> np.ndarray:
    """Crop and flip image by image, with numpy's edge padding."""
    n, _, h, w = images.shape
    out = np.empty_like(images)
    for i in range(n):
        padded = np.pad(images[i], ((0, 0), (padding, padding), (padding, padding)), mode="edge")
        crop = padded[:, rows[i] : rows[i] + h, cols[i] : cols[i] + w]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_crop_flip_equals_hand_written_reference(padding: int) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(16, 2, 5, 7, generator=gen)
    aug = CropFlip(padding=padding)
    draws = aug.draw(16, torch.Generator().manual_seed(1))
    rows, cols, flips = (d.numpy() for d in draws)
    assert rows.max() <= 2 * padding and cols.max() <= 2 * padding
    # Every kind of draw occurs, so the comparison exercises crops and flips.
    assert flips.any() and not flips.all()
    if padding:
        assert len(set(rows.tolist())) > 1 and len(set(cols.tolist())) > 1
    expected = _reference(images.numpy(), rows, cols, flips, padding)
    torch.testing.assert_close(aug.apply(images, draws), torch.from_numpy(expected))


def test_crop_flip_without_flip_never_mirrors() -> None:
    images = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    aug = CropFlip(padding=0, flip=False)
    for seed in range(5):
        assert torch.equal(aug(images, torch.Generator().manual_seed(seed)), images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"padding": -1}, "padding: -1"), ({"padding": 1.5}, "padding: 1.5"),
     ({"padding": True}, "padding: True")],
)  # fmt: skip
def test_crop_flip_rejects_bad_padding(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CropFlip(**kwargs)


def test_crop_flip_rejects_non_images() -> None:
    with pytest.raises(TypeError, match="flip: 1"):
        CropFlip(flip=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(4, 9\)"):
        CropFlip()(torch.zeros(4, 9), torch.Generator())


# --- the training stream ------------------------------------------------------------------------


def _images(n: int = 40) -> TensorSplit:
    gen = torch.Generator().manual_seed(5)
    return TensorSplit(torch.randn(n, 1, 6, 6, generator=gen), torch.arange(n) % 4)


def _stream(seed: int, **kw) -> Batches:
    gen = torch.Generator().manual_seed(seed)
    return Batches(_images(), 8, shuffle=True, generator=gen, drop_last=True,
                   augment=CropFlip(padding=2), **kw)  # fmt: skip


def _passes(stream: Batches, n: int = 2) -> list[torch.Tensor]:
    return [x for _ in range(n) for x, _ in stream]


def test_stream_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    a, b, c = _passes(_stream(0)), _passes(_stream(0)), _passes(_stream(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_stream_augments_the_batches_of_the_plain_stream() -> None:
    aug = CropFlip(padding=2)
    gen = torch.Generator().manual_seed(3)
    stream = Batches(_images(), 8, shuffle=True, generator=gen, drop_last=True, augment=aug)
    got = list(stream)
    # The same generator without augmentation: the permutation comes first, then the draw of
    # the pass's augmentation seed, so the batches hold the same samples in the same order.
    gen2 = torch.Generator().manual_seed(3)
    order = torch.randperm(40, generator=gen2)
    draws_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=gen2)))
    split = _images()
    for b, (x, y) in enumerate(got):
        idx = order[8 * b : 8 * (b + 1)]
        assert torch.equal(y, split.targets[idx])
        torch.testing.assert_close(x, aug(split.inputs[idx], draws_gen))
        assert not torch.equal(x, split.inputs[idx])


def test_shards_of_an_augmented_step_are_the_augmented_batch() -> None:
    whole = list(_stream(4))
    shards = [list(_stream(4).sharded(rank, 2)) for rank in range(2)]
    for b, (x, y) in enumerate(whole):
        for rank in range(2):
            xs, ys = shards[rank][b]
            assert torch.equal(xs, x[rank::2]) and torch.equal(ys, y[rank::2])


def test_stream_refuses_augmenting_non_images() -> None:
    flat = TensorSplit(torch.zeros(8, 5), torch.zeros(8, dtype=torch.long))
    gen = torch.Generator()
    with pytest.raises(ValueError, match=r"shape \(8, 5\)"):
        Batches(flat, 4, shuffle=True, generator=gen, augment=CropFlip())
    with pytest.raises(ValueError, match="augment needs a torch"):
        Batches(_images(), 4, augment=CropFlip())
    with pytest.raises(TypeError, match="augment: 'crop'"):
        Batches(_images(), 4, shuffle=True, generator=gen, augment="crop")  # type: ignore[arg-type]


# --- recipes and tasks --------------------------------------------------------------------------


def _toy_task(augment: CropFlip | None) -> Task:
    split = _images()
    ds = Dataset("toy-img", "vision", split, _images(16), _images(16), 4, tuple("abcd"))
    recipe = Recipe("sgd", lr=0.1, weight_decay=0.0, batch_size=8, epochs=1, augment=augment)
    return Task("toy-img", "vision", "toy-img", "cnn", lambda d: ResNetCNN(4, width=4),
                quick=recipe, data=ds)  # fmt: skip


def test_task_augments_training_batches_only() -> None:
    plain = _toy_task(None).load(seed=2)
    aug = _toy_task(CropFlip(padding=2)).load(seed=2)
    assert plain.train.augment is None
    assert aug.train.augment == CropFlip(padding=2)
    for name in ("train_eval", "val", "test"):
        for (x, y), (xa, ya) in zip(getattr(plain, name), getattr(aug, name), strict=True):
            assert torch.equal(x, xa) and torch.equal(y, ya)
    # The training stream's samples are the plain stream's (same permutation), augmented.
    (x, y), (xa, ya) = next(iter(plain.train)), next(iter(aug.train))
    assert torch.equal(y, ya) and not torch.equal(x, xa)


class _Recorder(nn.Module):
    """A small CNN that keeps every input of a training step (not the averages' BN updates)."""

    def __init__(self, seen: list[torch.Tensor]) -> None:
        super().__init__()
        self.net, self.seen = ResNetCNN(4, width=4), seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.seen.append(x.clone())
        return self.net(x)


def _inputs_seen(method: str, rho: float | None = None) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    task = replace(_toy_task(CropFlip(padding=2)), build_model=lambda d: _Recorder(seen))
    spec = RunSpec("toy-img", method, 0, "quick", hyper=Hyper(rho=rho))
    assert train(spec, task=task).record["status"] == "ok"
    return seen


def test_methods_train_on_the_same_augmented_batches() -> None:
    base = _inputs_seen("baseline")
    sam = _inputs_seen("sam", rho=0.05)
    # SAM's two passes of a step see one batch, and its first passes are the baseline's batches.
    assert len(sam) == 2 * len(base) == 2 * len(_toy_task(None).load().train)
    for b, x in enumerate(base):
        assert torch.equal(sam[2 * b], x) and torch.equal(sam[2 * b + 1], x)
    plain = [x for x, _ in _toy_task(None).load(seed=0).train]
    assert not any(torch.equal(x, p) for x, p in zip(base, plain, strict=True))


def test_recipe_rejects_a_bad_augment() -> None:
    with pytest.raises(TypeError, match="augment: 'crop-flip'"):
        Recipe("sgd", lr=0.1, weight_decay=0.0, batch_size=8, epochs=1, augment="crop-flip")  # type: ignore[arg-type]


def test_recipe_config_names_augment_only_when_set() -> None:
    base = Recipe("sgd", lr=0.1, weight_decay=0.0, batch_size=8, epochs=1)
    assert "augment" not in base.config()
    with_aug = Recipe("sgd", lr=0.1, weight_decay=0.0, batch_size=8, epochs=1,
                      augment=CropFlip(padding=3, flip=False))  # fmt: skip
    assert with_aug.config()["augment"] == {"padding": 3, "flip": False}


def test_augmented_task_hash_covers_the_augmentation() -> None:
    task = get_task("fashion-mnist-aug")
    full = task.recipe("full")
    assert full.augment == CropFlip(padding=2, flip=True)
    plain = replace(task, full=replace(full, augment=None))
    spec = RunSpec("fashion-mnist-aug", "baseline", 0, "full")
    assert spec.config(task)["recipe"]["augment"] == {"padding": 2, "flip": True}
    assert spec.config_hash(task) != spec.config_hash(plain)


def test_the_full_suite_runs_the_clean_regime_task_tuned():
    from flatmin.bench import get_suite

    suite = get_suite("full")
    assert "fashion-mnist-aug" in suite.tasks and suite.tune and suite.seeds == 5
    assert suite.methods == ("baseline", "swa", "swa-lr", "sam", "wasam")
    assert "fashion-mnist-aug" not in suite.task_seeds
    assert get_task("fashion-mnist-aug").recipe("full").augment is not None
