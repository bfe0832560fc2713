"""model.onnx run by onnxruntime on CPU: the light backend of the runtime.

Imports only numpy and onnxruntime (about 0.2 s and 50 MB, against 3 s and
400 MB for MindSpore), so an application serving an ONNX bundle never loads
MindSpore or the builder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BundleError
from .format import INPUT_NAMES, TABLE_PREFIX, TASK_INPUT
from .tuning import default_threads

# onnxruntime fuses Add + LayerNormalization into SkipLayerNormalization and
# Add + Gelu into BiasGelu.  Whether that is faster depends on the CPU (on an
# AMD EPYC the int8 graph lost a quarter of its speed to them, on an Intel
# Sapphire Rapids fp32 gained 3%), so both are variants runtime.tuning times.
UNFUSED = ["SkipLayerNormFusion", "BiasGeluFusion"]  # what the "unfused" variant turns off (bench/perf/fusion.py)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """How the runtime runs a graph (benchmarks use the same, to measure what users get)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One request at a time through a chain of GEMMs: all threads go to
    # parallelism inside each operator, none to running operators side by side.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    return options


class OnnxModel:
    """Same call as MindSporeModel: int32 [batch, seq] arrays in, float32 logits out."""

    platform = "onnxruntime_onnx"  # what V2 model metadata calls it (Triton's name)

    # onnxruntime plans every call afresh, so a new sequence length costs
    # nothing: pad a batch to its longest row and not a token more.
    pad_multiple = 1
    # The graph's ops as written first: the default, what the builder's checks and recorded metrics ran.
    # runtime.tuning times those `variants_for` a precision allows (fp32: the fused kernels sum in another order,
    # within 1e-6).
    variants = ("unfused", "fused")
    version = ort.__version__
    tuned = True
    token_budget = None  # padded tokens per call (runtime.tuning); None: a caller's batch in one call
    call_tokens = None  # what one more call costs in padded tokens (runtime.tuning.calls); None: not cut

    @classmethod
    def variants_for(cls, precision: str) -> tuple:
        # An int8 graph's fixed activation steps turn a fused kernel's last-bit differences into a neighbouring
        # step now and then: it runs as its recorded accuracy was measured, unfused.
        return cls.variants[:1] if precision == "int8" else cls.variants

    def __init__(self, path: Path, device: str = "CPU", threads: int | None = None, tables: dict | None = None,
                 variant: str | None = None, precision: str | None = None):
        # `device`: the backends registry opens every model with one (it checked CPU already).  `tables`: a merged
        # bundle's task tables (runtime.format), fed to the graph on every call.  `variant`: one of `variants`.
        # `precision`: the graph's own (the backends registry chose the file by it).
        options = session_options(threads)
        self.variant = variant or self.variants[0]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=UNFUSED if self.variant == "unfused" else [])
        except Exception as e:  # onnxruntime raises its own types for unreadable graphs
            raise BundleError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from e
        names = [i.name for i in self.session.get_inputs()]
        unknown = set(names) - {*INPUT_NAMES, TASK_INPUT} - {n for n in names if n.startswith(TABLE_PREFIX)}
        if unknown:
            raise BundleError(f"{path}: unexpected graph inputs {sorted(unknown)} (expected {', '.join(INPUT_NAMES)}"
                              f" and, for several tasks, {TASK_INPUT} and the task tables)")
        wanted = [n for n in names if n.startswith(TABLE_PREFIX)]
        missing = sorted(set(wanted) - set(tables or {}))
        if missing:
            raise BundleError(f"{path}: the graph takes task tables the bundle does not hold: {', '.join(missing)}")
        # Wrapped once: onnxruntime then reads the arrays in place on every call, whatever their size.
        self.tables = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tables[n])) for n in wanted}
        self.input_names = [n for n in names if n not in self.tables]  # a graph may not use all three (e.g. types)
        self.path = path
        width = self.session.get_outputs()[0].shape[-1]
        self.logits_width = width if isinstance(width, int) else None  # pt-build's graphs declare it

    def swap_tables(self, tables: dict) -> None:
        """Feed these task tables from the next call on (a task store's shared table, runtime.store): wrapped in
        place, so rows written into them later are read too; a call running keeps the ones it started with."""
        self.tables = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tables[n])) for n in self.tables}

    def __call__(self, ids, mask, types, task_ids=None) -> np.ndarray:
        """`task_ids` [batch]: a multi-task graph's row tasks (format.TASK_INPUT)."""
        arrays = dict(zip((*INPUT_NAMES, TASK_INPUT), (ids, mask, types, task_ids)))
        feed = {name: np.ascontiguousarray(arrays[name], dtype=np.int32) for name in self.input_names}
        return self.session.run(None, {**feed, **self.tables})[0]
