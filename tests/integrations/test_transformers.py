"""flatmin.integrations.transformers: one SAMTrainer run equals the same steps written by hand.

Models are tiny and randomly initialised from a config (no download); the text is Rotten Tomatoes
from flatmin's own data cache. A recording subclass keeps the micro-batches the Trainer drew and
the global RNG state at each; the reference replays them through flatmin's public API
(accumulation_closure + SAM.step(model=, same_rng=True), sam_step_amp, WeightAveraging).
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="needs the 'transformers' extra")
pytest.importorskip("accelerate", reason="needs the 'transformers' extra")

import flatmin  # noqa: E402
from flatmin.integrations.transformers import SAMTrainer  # noqa: E402
from flatmin.optim.accumulation import accumulation_closure  # noqa: E402
from flatmin.optim.amp import sam_step_amp  # noqa: E402

F = nn.functional
DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "transformers.md"
VOCAB, LENGTH, N, BATCH = 300, 16, 64, 8

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)
transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def examples():
    """The first N Rotten Tomatoes reviews: token ids cut to LENGTH, rare words mapped to <unk>."""
    from flatmin.tasks import get_task

    data = get_task("rotten-tomatoes").load("quick", seed=0)
    split = data.dataset.train
    ids = split.inputs[:N, :LENGTH].clone()
    ids[ids >= VOCAB] = 1
    return [
        {"input_ids": ids[i], "attention_mask": (ids[i] != 0).long(), "labels": split.targets[i]}
        for i in range(N)
    ]


def _bert(dropout=0.1):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return transformers.BertForSequenceClassification(config)


class BagBN(nn.Module):
    """Bag of embeddings, BatchNorm, dropout: a model whose second pass must not move BN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.EmbeddingBag(VOCAB, 8, mode="mean")
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.emb(input_ids)  # padding (id 0) is a token like any other here
        logits = self.out(self.drop(torch.relu(self.bn(h))))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Recording(SAMTrainer):
    """Keeps what the Trainer fed each pass-1 training_step, and the RNG state there."""

    # BERT's classification loss ignores num_items_in_batch, so by default the Trainer sums the
    # micro-batch means (without SAM too); averaging them keeps the reference the usual mean.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.record.append((copy.deepcopy(inputs), torch.random.get_rng_state()))
        return super().training_step(model, inputs, num_items_in_batch)


def _args(tmp_path, **kw):
    opts = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "weight_decay": 0.0,
        "lr_scheduler_type": "constant",
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    opts.update(kw)
    return transformers.TrainingArguments(**opts)


def _reference(make_model, trainer, *, rho, autocast=None):
    """SAM by hand over the recorded micro-batches, one window per optimizer step."""
    k = trainer.args.gradient_accumulation_steps
    model = make_model()
    model.train()
    opt = _sam_like_trainer(trainer, model, rho=rho)

    def loss_fn(b):
        # Like accelerate: autocast around the forward only, never around backward.
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            return model(**b)["loss"]

    record = trainer.record
    for s in range(0, len(record), k):
        window = record[s : s + k]
        torch.random.set_rng_state(window[0][1])
        micro = [inputs for inputs, _ in window]
        closure = accumulation_closure(opt, loss_fn, micro, weights=[1 / len(micro)] * len(micro))
        opt.step(closure, model=model, same_rng=True)
    return model, opt


def _base(trainer, model):
    """The Trainer's param groups (weight decay or not, in its order), optimizer and arguments."""
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": trainer.args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    base_cls, base_kw = transformers.Trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    return groups, base_cls, base_kw


def _sam_like_trainer(trainer, model, **sam):
    groups, base_cls, base_kw = _base(trainer, model)
    # An instance: SAM's own ``eps`` keyword would otherwise take AdamW's ``eps``.
    base = base_cls(groups, **base_kw)
    clip = trainer.args.max_grad_norm or None  # the Trainer clips when > 0
    return flatmin.SAM(None, base, max_grad_norm=clip, **sam)


def _assert_same(a, b, atol=1e-6):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=name)


# -- SAM under the Trainer equals SAM by hand ---------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4])
def test_bert_sam_equals_hand_written(tmp_path, examples, k):
    trainer = Recording(
        model=_bert(),
        args=_args(tmp_path, gradient_accumulation_steps=k),
        train_dataset=examples,
        sam={"rho": 0.1},
    )
    out = trainer.train()
    assert out.global_step == 4 and len(trainer.record) == 4 * k
    ref, _ = _reference(_bert, trainer, rho=0.1)
    _assert_same(trainer.model, ref)


def test_plain_sam_optimizer_in_plain_trainer_raises(tmp_path, examples):
    # Without SAMTrainer the Trainer calls optimizer.step() once, without a closure: SAM refuses.
    model = _bert()
    opt = flatmin.SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=examples, optimizers=(opt, None)
    )
    with pytest.raises(RuntimeError, match="requires a closure"):
        trainer.train()


@pytest.mark.parametrize("k", [2, 4])
def test_batchnorm_frozen_in_second_pass(tmp_path, examples, k):
    trainer = Recording(
        model=BagBN(),
        args=_args(tmp_path, gradient_accumulation_steps=k),
        train_dataset=examples,
        sam={"rho": 0.2},
    )
    trainer.train()
    assert int(trainer.model.bn.num_batches_tracked) == 4 * k  # pass 1 only
    ref, _ = _reference(BagBN, trainer, rho=0.2)
    _assert_same(trainer.model, ref)


def test_second_pass_switches_change_the_result(tmp_path, examples):
    trainer = Recording(
        model=BagBN(),
        args=_args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=examples,
        sam={"rho": 0.2},
        same_rng=False,
        freeze_bn=False,
    )
    trainer.train()
    assert int(trainer.model.bn.num_batches_tracked) == 2 * 4 * 2
    ref, _ = _reference(BagBN, trainer, rho=0.2)
    diff = max(
        (a - b).abs().max().item() for a, b in zip(trainer.model.parameters(), ref.parameters())
    )
    assert diff > 1e-4


def test_adaptive_sam_options_and_linear_schedule(tmp_path, examples):
    trainer = Recording(
        model=_bert(),
        args=_args(tmp_path, lr_scheduler_type="linear", max_grad_norm=0.5),
        train_dataset=examples,
        sam={"rho": 0.5, "adaptive": True},
    )
    trainer.train()
    ref_model = _bert()
    ref_model.train()
    opt = _sam_like_trainer(trainer, ref_model, rho=0.5, adaptive=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, (4 - t) / 4))
    for inputs, rng in trainer.record:
        torch.random.set_rng_state(rng)
        closure = accumulation_closure(opt, lambda b: ref_model(**b)["loss"], [inputs])
        opt.step(closure, model=ref_model, same_rng=True)
        sched.step()
    _assert_same(trainer.model, ref_model)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


# -- mixed precision ----------------------------------------------------------------------------
def test_bf16_through_accelerate(tmp_path, examples):
    trainer = Recording(
        model=_bert(),
        args=_args(tmp_path, gradient_accumulation_steps=2, bf16=True),
        train_dataset=examples,
        sam={"rho": 0.1},
    )
    trainer.train()
    ref, _ = _reference(_bert, trainer, rho=0.1, autocast=torch.bfloat16)
    _assert_same(trainer.model, ref)


@pytest.mark.parametrize(
    ("k", "init_scale", "rho"),
    [(1, 2.0**8, 0.5), (2, 2.0**8, 0.5), (1, 2.0**20, 5.0), (2, 2.0**20, 5.0)],
)
def test_fp16_grad_scaler_equals_sam_step_amp(tmp_path, examples, k, init_scale, rho):
    # accelerate runs fp16 (autocast + GradScaler) on GPUs only; on CPU the test switches it on
    # by hand, so the Trainer's path (autocast forward, scaled backward, unscale before clipping,
    # scaler.step, update) runs as on a GPU. 2**20 with rho=5 overflows some steps in the first
    # pass and some only at w + ε̂ (skipped with the weights restored).
    trainer = Recording(
        model=BagBN(),
        args=_args(tmp_path, gradient_accumulation_steps=k, fp16=True, max_steps=6),
        train_dataset=examples,
        sam={"rho": rho},
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.accelerator.native_amp = True
    trainer.train()

    ref_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    model = BagBN()
    model.train()
    opt = _sam_like_trainer(trainer, model, rho=rho)
    skips = []
    for s in range(0, len(trainer.record), k):
        window = trainer.record[s : s + k]
        torch.random.set_rng_state(window[0][1])
        calls = []

        def loss_fn(b, calls=calls):
            calls.append(1)
            with torch.autocast("cpu", dtype=torch.float16):
                return model(**b)["loss"]

        closure = accumulation_closure(
            opt,
            loss_fn,
            [inputs for inputs, _ in window],
            weights=[1 / k] * k,
            backward=lambda loss: ref_scaler.scale(loss).backward(),
        )
        if sam_step_amp(opt, ref_scaler, closure, model=model, same_rng=True).skipped:
            skips.append("second pass" if len(calls) > k else "first pass")
    _assert_same(trainer.model, model)
    assert trainer.accelerator.scaler.get_scale() == ref_scaler.get_scale()
    if init_scale > 2.0**16:
        assert set(skips) == {"first pass", "second pass"}


# -- checkpoints, resume, averaging -------------------------------------------------------------
def test_resume_from_checkpoint_is_bit_identical(tmp_path, examples):
    def make(out):
        return SAMTrainer(
            model=_bert(),
            args=_args(
                tmp_path,
                output_dir=str(out),
                gradient_accumulation_steps=2,
                save_strategy="steps",
                save_steps=2,
                lr_scheduler_type="linear",
            ),
            train_dataset=examples,
            sam={"rho": 0.1},
            averaging={"mode": "ema", "decay": 0.5},
        )

    full = make(tmp_path / "full")
    full.train()
    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    fa = full.optimizer.optimizer.averaging.state_dict()
    fb = resumed.optimizer.optimizer.averaging.state_dict()
    assert fa["n_averaged"] == fb["n_averaged"] == 4
    for name, t in fa["shadow"].items():
        assert torch.equal(t, fb["shadow"][name]), name
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert set(saved) == {"sam", "base", "variant"} and saved["base"]["state"]
    assert saved["variant"]["extra"]["averaging"]["n_averaged"] == 2  # WASAM's average is saved


def test_restart_without_optimizer_state_would_differ(tmp_path, examples):
    # The resume test can fail: restarting from checkpoint-2's weights with a fresh optimizer
    # (no Adam moments) gives other weights.
    args = _args(tmp_path, save_strategy="steps", save_steps=2)
    full = SAMTrainer(model=_bert(), args=args, train_dataset=examples, sam={"rho": 0.1})
    full.train()
    restarted_model = transformers.BertForSequenceClassification.from_pretrained(
        str(tmp_path / "out" / "checkpoint-2")
    )
    again = SAMTrainer(
        model=restarted_model,
        args=_args(tmp_path, output_dir=str(tmp_path / "again"), max_steps=2),
        train_dataset=examples,
        sam={"rho": 0.1},
    )
    again.train()
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(full.model.parameters(), again.model.parameters())
    )
    assert diff > 1e-5


def test_wasam_average_exported_with_save_pretrained(tmp_path, examples):
    trainer = Recording(
        model=_bert(),
        args=_args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=examples,
        sam={"rho": 0.1},
        averaging={"mode": "swa", "start": 2},
    )
    trainer.train()
    trainer.save_averaged_model(str(tmp_path / "averaged"))
    exported = transformers.BertForSequenceClassification.from_pretrained(
        str(tmp_path / "averaged")
    )

    snapshots = []
    # The reference: SAM by hand, and the plain mean of its iterates from step 2 on.
    model = _bert()
    model.train()
    opt = _sam_like_trainer(trainer, model, rho=0.1)
    for s in range(0, len(trainer.record), 2):
        window = trainer.record[s : s + 2]
        torch.random.set_rng_state(window[0][1])
        closure = accumulation_closure(
            opt, lambda b: model(**b)["loss"], [i for i, _ in window], weights=[0.5, 0.5]
        )
        opt.step(closure, model=model, same_rng=True)
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, p in exported.named_parameters():
        mean = torch.stack([snap[name] for snap in snapshots[1:]]).mean(0)
        torch.testing.assert_close(p.detach(), mean, atol=1e-6, rtol=0, msg=name)
    # The training weights are back in the model after the export.
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), snapshots[-1][name], atol=1e-6, rtol=0, msg=name)


# -- misuse -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make_opt", "exc", "match"),
    [
        (lambda m: flatmin.ESAM(m.parameters(), torch.optim.SGD, lr=0.1), TypeError, "ESAM"),
        (lambda m: flatmin.LookSAM(m.parameters(), torch.optim.SGD, lr=0.1), TypeError, "LookSAM"),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), TypeError, "needs a flatmin.SAM"),
    ],
)
def test_unsupported_optimizers_raise_before_training(tmp_path, examples, make_opt, exc, match):
    model = _bert()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SAMTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=examples,
        optimizers=(make_opt(model), None),
    )
    with pytest.raises(exc, match=match):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_argument_errors(tmp_path, examples):
    model = _bert()
    opt = flatmin.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="averaging="):
        SAMTrainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=examples,
            optimizers=(opt, None),
            averaging={"mode": "ema"},
        )
    trainer = SAMTrainer(model=_bert(), args=_args(tmp_path, max_steps=1), train_dataset=examples)
    trainer.train()
    with pytest.raises(RuntimeError, match="needs a WASAM"):
        trainer.save_averaged_model(str(tmp_path / "x"))


# -- the documentation page ---------------------------------------------------------------------
def test_documentation_code_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "transformers_doc"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # ... but an example that misuses SAM (backward() before step(closure)) fails.
        warnings.filterwarnings("error", message=".*found gradients computed before")
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
