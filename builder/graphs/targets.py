"""Export targets, a registry: each graph format a bundle carries, how to write it, load it back, and how close
to the trained net it must come (the parity probes).  The ONNX writer is chosen by the net's class."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ptbundle.runtime.format import GRAPHS, task_axis
from ptbundle.runtime.mindspore_backend import MindSporeModel
from ptbundle.runtime.onnx_backend import OnnxModel

from ..errors import ExportError
from .onnx_decoder_classifier import export_decoder_classifier, export_decoder_multitask
from .onnx_encoder import export_classifier, export_multitask
from ..models.classifier import MultiTaskClassifier, PromptClassifier, TableInputs
from ..models.decoder import DecoderClassifier, DecoderMultiTask
from ..models.device import eager


PARITY_SHAPES = ((1, 8), (3, 16), (8, 40))  # (batch, seq) probes at export time


@functools.singledispatch
def export_onnx(net, path) -> Path:
    """`net` as ONNX at `path`, by the writer registered for its class."""
    raise ExportError(f"no ONNX writer for {type(net).__name__}")


export_onnx.register(PromptClassifier, export_classifier)
export_onnx.register(MultiTaskClassifier, export_multitask)
export_onnx.register(DecoderClassifier, export_decoder_classifier)
export_onnx.register(DecoderMultiTask, export_decoder_multitask)


def export_mindir(net, path: Path) -> Path:
    """MINDIR with dynamic batch and sequence axes (for a merged net, task_ids [batch] and its task tables, any
    number of tasks: runtime.format)."""
    net.set_train(False)
    spec = Tensor(shape=[None, None], dtype=ms.int32)
    extra = ()
    if net.tables is not None:
        net = TableInputs(net)
        extra = (Tensor(shape=[None], dtype=ms.int32),) + tuple(
            Tensor(shape=[None if k == task_axis(name) else d for k, d in enumerate(array.shape)],
                   dtype=ms.int32 if array.dtype == np.int32 else ms.float32)
            for name, array in ((n, net.net.tables[n]) for n in net.net.table_order))
    ms.export(net, spec, spec, spec, *extra, file_name=str(Path(path).with_suffix("")), file_format="MINDIR")
    return Path(path)


@dataclass(frozen=True)
class Target:
    """A graph format the bundle carries: how to write it, how to run it back, how close it must come."""

    name: str
    file: str
    tolerance: float  # max |logit difference| from the trained net on the parity probes
    export: Callable  # (net, path) -> path
    load: Callable  # (path, device, task tables or None) -> model called like the runtime's backends


TARGETS: dict = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


# MindIR runs the very same kernels (measured difference 0.0); onnxruntime's
# fused kernels sum in another order (the manifest's export.onnx records it:
# 1.0e-6 on MiniLM).  MindIR is checked on the device the build runs on.
register(Target("mindir", GRAPHS["mindir"], 1e-5, export_mindir, MindSporeModel))
register(Target("onnx", GRAPHS["onnx"], 1e-4, export_onnx, lambda path, device, tables: OnnxModel(path, tables=tables)))


def probe_inputs(vocab_size: int, pad_id: int, seed: int = 0, tasks: int | None = None):
    """Random id batches with ragged lengths, padded as the runtime pads; for a graph taking task ids (`tasks` of
    them: a merged one, of one task too), random task ids."""
    rng = np.random.RandomState(seed)
    for ids, mask in ragged_batches(rng, PARITY_SHAPES, vocab_size, pad_id, np.int32, shortest=3):
        arrays = (ids, mask, np.zeros_like(ids))
        yield arrays + ((rng.randint(0, tasks, len(ids)).astype(np.int32),) if tasks is not None else ())


def ragged_batches(rng, shapes, vocab_size: int, pad_id: int, dtype, shortest: int, first_full: bool = False):
    """(ids, mask) per (batch, seq) of `shapes`: rows of random ids from `shortest` (or seq / 2) to seq long,
    right-padded as the runtime pads (the first row seq long with `first_full`)."""
    for batch, seq in shapes:
        lengths = rng.randint(max(shortest, seq // 2), seq + 1, batch)
        if first_full:
            lengths[0] = seq
        ids = np.full((batch, seq), pad_id, dtype)
        mask = np.zeros((batch, seq), dtype)
        for r, n in enumerate(lengths):
            ids[r, :n], mask[r, :n] = rng.randint(0, vocab_size, n), 1
        yield ids, mask


def reference_outputs(net, vocab_size: int, pad_id: int) -> list:
    """(probe arrays, the in-memory net's logits) for every probe, computed once for all targets.

    Eagerly: in graph mode each probe shape compiles a graph that runs once
    (for SmolLM2 that took several times longer than the eager pass, with the
    same numbers)."""
    net.set_train(False)
    with eager():
        return [(arrays, net(*(Tensor(a) for a in arrays)).asnumpy())
                for arrays in probe_inputs(vocab_size, pad_id,
                                               tasks=net.task_count if net.tables is not None else None)]


def check_parity(references: list, reloaded, target: Target) -> float:
    """Max |logit difference| between the in-memory net (reference_outputs) and an exported graph."""
    worst = 0.0
    for arrays, expected in references:
        worst = max(worst, float(np.abs(reloaded(*arrays) - expected).max()))
    if not worst <= target.tolerance:  # NaN fails too
        raise ExportError(f"exported {target.name} graph differs from the trained model by {worst:.2e}"
                          f" (> {target.tolerance})")
    return worst

