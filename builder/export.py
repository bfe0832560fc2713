"""Fold a trained classifier into a bundle directory, atomically.

The prompt and head are Parameters of the inference Cell; every export
target (a small registry: MindIR, ONNX) writes them into its graph as
constants, so the exported model needs nothing but token ids.  A bundle is
assembled in a hidden temporary directory beside its destination and
renamed into place only when every file is written and each reloaded graph
has been checked against the in-memory model.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import mindspore as ms
from mindspore import Tensor
from safetensors.numpy import save_file

from ptbundle.runtime.format import GRAPHS, PROMPT, TOKENIZER, TRAINING_LOG, Manifest, bundle_files, sha256_file
from ptbundle.runtime.mindspore_backend import MindSporeModel
from ptbundle.runtime.onnx_backend import OnnxModel
from ptbundle.runtime.text import load_tokenizer

from .errors import ExportError
from .model import eager
from .onnx_export import export_onnx
from .peft import bundle_adapter
from .quantize import Int8Inputs, quantize_int8

PARITY_SHAPES = ((1, 8), (3, 16), (8, 40))  # (batch, seq) probes at export time


def export_mindir(net, path: Path) -> Path:
    """MINDIR with dynamic batch and sequence axes (and task_ids [batch] for a MultiTaskClassifier)."""
    net.set_train(False)
    spec = Tensor(shape=[None, None], dtype=ms.int32)
    tasks = (Tensor(shape=[None], dtype=ms.int32),) if task_count(net) > 1 else ()
    ms.export(net, spec, spec, spec, *tasks, file_name=str(Path(path).with_suffix("")), file_format="MINDIR")
    return Path(path)


def task_count(net) -> int:
    return len(getattr(net, "specs", ())) or 1


@dataclass(frozen=True)
class Target:
    """A graph format the bundle carries: how to write it, how to run it back, how close it must come."""

    name: str
    file: str
    tolerance: float  # max |logit difference| from the trained net on the parity probes
    export: Callable  # (net, path) -> path
    load: Callable  # (path, device) -> model called like the runtime's backends


TARGETS: dict = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


# MindIR runs the very same kernels (measured difference 0.0); onnxruntime's
# fused kernels sum in another order (the manifest's export.onnx records it:
# 1.0e-6 on MiniLM).  MindIR is checked on the device the build runs on.
register(Target("mindir", GRAPHS["mindir"], 1e-5, export_mindir, MindSporeModel))
register(Target("onnx", GRAPHS["onnx"], 1e-4, export_onnx, lambda path, device: OnnxModel(path)))


def probe_inputs(vocab_size: int, pad_id: int, seed: int = 0, tasks: int = 1):
    """Random id batches with ragged lengths, padded as the runtime pads; with several tasks, also random task ids."""
    rng = np.random.RandomState(seed)
    for batch, seq in PARITY_SHAPES:
        lengths = rng.randint(max(3, seq // 2), seq + 1, batch)
        rows = [rng.randint(0, vocab_size, n) for n in lengths]
        ids = np.full((batch, seq), pad_id, np.int32)
        mask = np.zeros((batch, seq), np.int32)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = row, 1
        arrays = (ids, mask, np.zeros_like(ids))
        yield arrays + ((rng.randint(0, tasks, batch).astype(np.int32),) if tasks > 1 else ())


def reference_outputs(net, vocab_size: int, pad_id: int) -> list:
    """(probe arrays, the in-memory net's logits) for every probe, computed once for all targets.

    Eagerly: in graph mode each probe shape compiles a graph that runs once
    (for SmolLM2 that took several times longer than the eager pass, with the
    same numbers)."""
    net.set_train(False)
    with eager():
        return [(arrays, net(*(Tensor(a) for a in arrays)).asnumpy())
                for arrays in probe_inputs(vocab_size, pad_id, tasks=task_count(net))]


def check_parity(references: list, reloaded, target: Target) -> float:
    """Max |logit difference| between the in-memory net (reference_outputs) and an exported graph."""
    worst = 0.0
    for arrays, expected in references:
        worst = max(worst, float(np.abs(reloaded(*arrays) - expected).max()))
    if not worst <= target.tolerance:  # NaN fails too
        raise ExportError(f"exported {target.name} graph differs from the trained model by {worst:.2e}"
                          f" (> {target.tolerance})")
    return worst


def library_versions() -> dict:
    import onnx
    import onnxruntime
    import tokenizers

    return {"python": platform.python_version(), "mindspore": ms.__version__, "numpy": np.__version__,
            "tokenizers": tokenizers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def write_bundle(destination, net, backbone, manifest: Manifest, curve,
                 int8: Int8Inputs | None = None, verify: Callable | None = None) -> Manifest:
    """Write every file of the bundle, check it, then move it into place; return the manifest written.

    `manifest` describes the bundle; this adds what only the export knows
    (parity, files and hashes, versions, time) to a new Manifest, never
    changing the caller's.  With `int8` (build.int8_inputs), an int8 ONNX
    graph is added and its accuracy recorded as the task's metrics["int8"].
    The prompt and head also go into peft/ as a PEFT adapter when PEFT can
    express them (builder.peft); each task's details["peft"] says whether.
    `verify(directory)` checks the written graphs further before the move
    (it raises, or returns entries for the manifest's export record).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        references = reference_outputs(net, backbone.config.vocab_size, manifest.pad_id)
        parity, written = {}, manifest
        for target in TARGETS.values():
            path = target.export(net, tmp / target.file)
            parity[target.name] = check_parity(references, target.load(path, manifest.device), target)
        if verify is not None:
            parity.update(verify(tmp))
        if int8 is not None:
            task = manifest.only
            written = written.replace_task(task.name, metrics={**task.metrics, "int8": quantize_int8(
                tmp / GRAPHS["onnx"], tmp / GRAPHS["onnx-int8"], manifest.pad_id, int8.eval_sets, int8.calibration)})
        # The tokenizer truncates per task at run time (runtime.text.load_tokenizer); the file is the backbone's.
        load_tokenizer(backbone.tokenizer_path, max(t.max_length for t in manifest.tasks)).save(str(tmp / TOKENIZER))
        save_file(net.head_state(), str(tmp / PROMPT))
        (tmp / TRAINING_LOG).write_text(json.dumps(curve, indent=2))
        written = bundle_adapter(tmp, net, written, backbone)
        files = bundle_files(tmp)  # nested ones by their relative path: "peft/adapter_config.json"
        for name in files:
            (tmp / name).chmod(0o644)  # MindSpore writes the graph read-only for its owner
        written = written.replace(
            export={**manifest.export, **parity}, files={name: sha256_file(tmp / name) for name in files},
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            versions=library_versions())
        write_manifest(tmp, written)
        replace_directory(tmp, destination)
    except BaseException:  # Ctrl-C included: never leave a half bundle
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def write_manifest(directory: Path, manifest: Manifest) -> None:
    manifest.write(directory)


def replace_directory(new: Path, destination: Path) -> None:
    """Put `new` at `destination`; an existing bundle there is replaced whole."""
    if destination.exists():
        old = destination.parent / f".{destination.name}.old-{os.getpid()}"
        os.replace(destination, old)
        os.replace(new, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, destination)
