"""SAM, WASAM and weight averaging inside the trainers people already use.

* :mod:`flatmin.integrations.lightning` — :class:`~flatmin.integrations.lightning.SAMModule` (a
  ``LightningModule`` base class that steps SAM correctly in automatic and manual optimization,
  with gradient accumulation, ``bf16-mixed`` / ``16-mixed`` and checkpoint resume) and
  :class:`~flatmin.integrations.lightning.WeightAveragingCallback`. Extra: ``flatmin[lightning]``.
* :mod:`flatmin.integrations.transformers` — :class:`~flatmin.integrations.transformers.SAMTrainer`,
  a Hugging Face ``Trainer`` whose optimizer steps are SAM steps (both passes over every
  micro-batch), with mixed precision through accelerate, resumable checkpoints and the weight
  average exported with ``save_pretrained``. Extra: ``flatmin[transformers]``.

The submodules import their framework on import; this package imports neither, and ``optim/``
never imports this package.
"""
