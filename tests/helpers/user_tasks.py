"""A user's task module (the source the ``user_module`` fixture of conftest.py writes)."""

from __future__ import annotations

USER_MODULE = '''
import torch
from torch import nn
from flatmin.bench import Recipe, Task, tensor_dataset

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 4, generator=g)
    y = torch.arange(90) % 3
    x = x + 2 * torch.nn.functional.one_hot(y, 4)[:, :4].float()
    return tensor_dataset("mine", train=(x[:60], y[:60]), val=(x[60:75], y[60:75]),
                          test=(x[75:], y[75:]))

def model(ds):
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, ds.num_classes))

recipe = Recipe("sgd", lr=0.1, weight_decay=0.0, batch_size=16, epochs=2)
task = Task("mine", "tabular", "mine", "MLP", model, quick=recipe, data=data)
folded = Task("mine-cv", "tabular", "mine", "MLP", model, quick=recipe, data=data, folds=3)

def make():
    return task

class Holder:
    inner = task

not_a_task = 3

def returns_int():
    return 1
'''
