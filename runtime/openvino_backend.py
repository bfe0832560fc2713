"""model.onnx run by OpenVINO on CPU: fp32, and bf16 on the CPU's bf16 units (AMX, AVX512_BF16).

An optional extra (pip install 'ptbundle[openvino]', about 180 MB): the
default install stays onnxruntime.  OpenVINO, Intel's inference runtime,
reads the bundle's model.onnx as it is, onnxruntime's `Attention` with a
prefix as its `past` included, and with bf16 inference precision runs its
matrix products on the CPU's bf16 instructions, which onnxruntime's CPU
kernels do not use: on an AMD EPYC with AVX512_BF16 1.4-1.6x onnxruntime's
fp32 at batch 64 (`.venv/bin/python bench/perf/inference.py --backends
onnxruntime,openvino`; docs/measured.md), with logits that move by a few
hundredths (bf16 keeps 8 bits of mantissa): `pt-build export --quantize
int8` records its accuracy, `pt-run eval --precision bf16` scores it.  A CPU without bf16 instructions
is refused for bf16 by name rather than emulated.  OpenVINO cannot read
model.int8.onnx (onnxruntime's own quantized operators): int8 stays
onnxruntime's.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import BundleError
from .format import INPUT_NAMES, TABLE_PREFIX, TASK_INPUT
from .tuning import default_threads

HINTS = {"fp32": "f32", "bf16": "bf16"}  # precision -> OpenVINO's inference precision hint


def import_openvino():
    try:  # the openvino extra: never on the default install's path
        import openvino
    except ImportError as e:
        raise BundleError(f"the openvino backend needs OpenVINO ({e}): pip install 'ptbundle[openvino]', or use"
                          f" backend='onnxruntime'") from e
    return openvino


class OpenVinoModel:
    """Same call as OnnxModel: int32 [batch, seq] arrays in, float32 logits out."""

    platform = "openvino"  # what V2 model metadata calls it (Triton's backend name)
    pad_multiple = 1  # any shape runs; OpenVINO caches what it prepares per shape
    variant = None
    tuned = True  # its token budget is measured like onnxruntime's (runtime.tuning)
    try:  # without importing it (seconds): the tuning record's key
        version = metadata.version("openvino")
    except metadata.PackageNotFoundError:
        version = None
    token_budget = None
    call_tokens = None  # what one more call costs in padded tokens (runtime.tuning.calls); None: not cut

    @staticmethod
    def variants_for(precision: str) -> tuple:
        return ()  # one way to open it: runtime.tuning times its token budgets only

    def __init__(self, path: Path, device: str = "CPU", tables: dict | None = None, variant: str | None = None,
                 precision: str = "fp32"):
        ov = import_openvino()
        core = ov.Core()
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU", {
                "INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": default_threads()})
        except Exception as e:  # OpenVINO raises RuntimeError with its C++ message for graphs it cannot read
            raise BundleError(f"{path}: OpenVINO cannot load it ({str(e).strip().splitlines()[0][:200]})") from e
        if precision == "bf16" and compiled.get_property("INFERENCE_PRECISION_HINT") != ov.Type.bf16:
            raise BundleError("this CPU has no bf16 instructions (OpenVINO runs bf16 on AMX or AVX512_BF16):"
                              " use precision fp32, or int8 with backend='onnxruntime'")
        names = [i.get_any_name() for i in compiled.inputs]
        unknown = set(names) - {*INPUT_NAMES, TASK_INPUT} - {n for n in names if n.startswith(TABLE_PREFIX)}
        if unknown:
            raise BundleError(f"{path}: unexpected graph inputs {sorted(unknown)}")
        wanted = [n for n in names if n.startswith(TABLE_PREFIX)]
        missing = sorted(set(wanted) - set(tables or {}))
        if missing:
            raise BundleError(f"{path}: the graph takes task tables the bundle does not hold: {', '.join(missing)}")
        self.tables = {n: np.ascontiguousarray(tables[n]) for n in wanted}
        self.input_names = [n for n in names if n not in self.tables]
        self.request = compiled.create_infer_request()
        self.precision, self.path = precision, path
        width = compiled.outputs[0].get_partial_shape()[-1]
        self.logits_width = width.get_length() if width.is_static else None

    def swap_tables(self, tables: dict) -> None:
        """As OnnxModel.swap_tables: read in place (share_inputs) from the next call on."""
        self.tables = {n: np.ascontiguousarray(tables[n]) for n in self.tables}

    def __call__(self, ids, mask, types, task_ids=None) -> np.ndarray:
        arrays = dict(zip((*INPUT_NAMES, TASK_INPUT), (ids, mask, types, task_ids)))
        feed = {name: np.ascontiguousarray(arrays[name], dtype=np.int32) for name in self.input_names}
        # share_inputs: the task tables (hundreds of MB for 1,000 tasks) are read in place, not copied per call
        self.request.infer({**feed, **self.tables}, share_inputs=True)
        return self.request.get_output_tensor(0).data.copy()
