"""The benchmark: methods as recipes, a resumable runner, the report (Kaddour et al. 2022).

A task is a :class:`Task` (data, model factory, loss, recipe, domain): a built-in name or the
user's own, by import path (``"mypkg.tasks:my_task"``; see ``docs/own_task.md``).

Example:
    >>> from flatmin.bench import BenchConfig, get_suite, run_grid
    >>> cfg = BenchConfig.from_suite(get_suite("quick"), "runs/quick")  # doctest: +SKIP
    >>> summary = run_grid(cfg)  # doctest: +SKIP

References:
    Kaddour et al., "When Do Flat Minima Optimizers Work?", NeurIPS 2022, arXiv:2202.00661.
"""

from flatmin.bench.api import BenchResult, MethodSummary, run
from flatmin.bench.executors import Executor, PoolExecutor, SerialExecutor
from flatmin.bench.methods import (
    METHODS,
    Grid,
    Hyper,
    Method,
    get_method,
    method_names,
    register_method,
    start_epoch,
    unknown_method_message,
)
from flatmin.bench.plan import TuneChoice, TuningPlan, plan_eval, plan_tuning
from flatmin.bench.records import (
    ErrorRecord,
    EvalRecord,
    MethodResult,
    Metrics,
    Record,
    TuneRecord,
    parse_record,
)
from flatmin.bench.report import summarize, write_report
from flatmin.bench.runner import (
    BenchConfig,
    GridSummary,
    RegistryResolver,
    method_result,
    run_grid,
)
from flatmin.bench.store import append_record, read_records
from flatmin.bench.suites import SUITES, Suite, get_suite, suite_names, unknown_suite_message
from flatmin.bench.train import NonFiniteLossError, RunSpec, TrainResult, evaluate, train
from flatmin.bench.tuning import GridTuner, SearchSummary, Tuner, TuningOutcome, TuningSession
from flatmin.data import tensor_dataset
from flatmin.tasks import Recipe, Task, get_task

__all__ = [
    "METHODS",
    "SUITES",
    "BenchConfig",
    "BenchResult",
    "ErrorRecord",
    "EvalRecord",
    "Executor",
    "Grid",
    "GridSummary",
    "GridTuner",
    "Hyper",
    "Method",
    "MethodResult",
    "MethodSummary",
    "Metrics",
    "NonFiniteLossError",
    "PoolExecutor",
    "Recipe",
    "Record",
    "RegistryResolver",
    "RunSpec",
    "SearchSummary",
    "SerialExecutor",
    "Suite",
    "Task",
    "TrainResult",
    "TuneChoice",
    "TuneRecord",
    "Tuner",
    "TuningOutcome",
    "TuningPlan",
    "TuningSession",
    "append_record",
    "evaluate",
    "get_method",
    "get_suite",
    "get_task",
    "method_names",
    "method_result",
    "parse_record",
    "plan_eval",
    "plan_tuning",
    "read_records",
    "register_method",
    "run",
    "run_grid",
    "start_epoch",
    "suite_names",
    "summarize",
    "tensor_dataset",
    "train",
    "unknown_method_message",
    "unknown_suite_message",
    "write_report",
]
