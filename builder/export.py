"""Fold a trained classifier into a bundle directory, atomically.

The prompt and head are Parameters of the inference Cell; `mindspore.export`
stores them inside model.mindir, and onnx_export writes them into model.onnx
as constants, so the exported model needs nothing but token ids.  A bundle is assembled in a hidden temporary directory beside its
destination and renamed into place only when every file is written and the
reloaded graph has been checked against the in-memory model.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor
from safetensors.numpy import save_file

from ptbundle.runtime.bundle import FORMAT_VERSION, MANIFEST, batched_logits, sha256_file
from ptbundle.runtime.metrics import classification_metrics
from ptbundle.runtime.mindspore_backend import MindSporeModel
from ptbundle.runtime.onnx_backend import OnnxModel
from ptbundle.runtime.text import load_tokenizer

from .onnx_export import HEAD_NODES, export_onnx

# MindIR runs the very same kernels (measured diff 0.0); onnxruntime's fused
# kernels sum in another order (measured 2.4e-6 on MiniLM).
TOLERANCE = {"mindir": 1e-5, "onnx": 1e-4}
PARITY_SHAPES = ((1, 8), (3, 16), (8, 40))  # (batch, seq) probes at export time


class ExportError(RuntimeError):
    pass


def export_mindir(net, path_stem: Path) -> Path:
    """MINDIR with dynamic batch and sequence axes."""
    net.set_train(False)
    spec = Tensor(shape=[None, None], dtype=ms.int32)
    ms.export(net, spec, spec, spec, file_name=str(path_stem), file_format="MINDIR")
    return path_stem.with_suffix(".mindir")


def probe_inputs(vocab_size: int, pad_id: int, seed: int = 0):
    """Random id batches with ragged lengths, padded as the runtime pads."""
    rng = np.random.RandomState(seed)
    for batch, seq in PARITY_SHAPES:
        lengths = rng.randint(max(3, seq // 2), seq + 1, batch)
        rows = [rng.randint(0, vocab_size, n) for n in lengths]
        ids = np.full((batch, seq), pad_id, np.int32)
        mask = np.zeros((batch, seq), np.int32)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = row, 1
        yield ids, mask, np.zeros_like(ids)


def check_parity(net, reloaded, kind: str, vocab_size: int, pad_id: int) -> float:
    """Max |logit difference| between the in-memory net and an exported graph."""
    worst = 0.0
    for arrays in probe_inputs(vocab_size, pad_id):
        expected = net(*(Tensor(a) for a in arrays)).asnumpy()
        worst = max(worst, float(np.abs(reloaded(*arrays) - expected).max()))
    if worst > TOLERANCE[kind]:
        raise ExportError(f"exported {kind} graph differs from the trained model by {worst:.2e} (> {TOLERANCE[kind]})")
    return worst


def quantize_int8(onnx_path: Path, int8_path: Path, pad_id: int, eval_sets: dict) -> dict:
    """Dynamically quantized copy of the ONNX graph, and its accuracy per split.

    fp32 needs no second evaluation: the parity check has shown model.onnx
    equal to the trained net, whose metrics the manifest already holds.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The encoder's GEMMs only: an int8 copy of the embedding tables
    # (quantize_dynamic's default also takes Gather) or of the tiny head saves
    # no time and costs accuracy.  One scale per weight column, not per
    # matrix: columns of different range each keep their precision, at the
    # same speed (MR: -0.38 pt test, recorded in the manifest).  Shape
    # inference cannot type the outputs of onnxruntime's contrib ops; all are float.
    quantize_dynamic(str(onnx_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Attention"], nodes_to_exclude=list(HEAD_NODES),
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    model = OnnxModel(int8_path)
    report = {}
    for split, (encodings, gold, num_labels) in eval_sets.items():
        predicted = batched_logits(model, encodings, pad_id, num_labels).argmax(-1)
        report[split] = classification_metrics(predicted, gold, num_labels)
    return report


def library_versions() -> dict:
    import onnx
    import onnxruntime
    import tokenizers

    return {"python": platform.python_version(), "mindspore": ms.__version__, "numpy": np.__version__,
            "tokenizers": tokenizers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def write_bundle(destination, net, backbone, manifest: dict, curve: list, int8_eval_sets: dict | None = None) -> Path:
    """Write every file of the bundle, check it, then move it into place.

    With `int8_eval_sets` ({split: (encodings, gold label ids, num_labels)}),
    an int8 ONNX graph is added and its accuracy recorded as metrics["int8"].
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        vocab, pad_id = backbone.config.vocab_size, manifest["pad_id"]
        mindir = export_mindir(net, tmp / "model")
        onnx_path = export_onnx(net, tmp / "model.onnx")
        manifest["export"] = {
            # MindIR is checked on CPU whatever the target device: it is the same graph.
            "mindir_max_abs_diff": check_parity(net, MindSporeModel(mindir, "CPU"), "mindir", vocab, pad_id),
            "onnx_max_abs_diff": check_parity(net, OnnxModel(onnx_path), "onnx", vocab, pad_id),
        }
        if int8_eval_sets:
            manifest["metrics"]["int8"] = quantize_int8(onnx_path, tmp / "model.int8.onnx", pad_id,
                                                             int8_eval_sets)
        load_tokenizer(backbone.tokenizer_path, manifest["max_length"]).save(str(tmp / "tokenizer.json"))
        save_file(net.head_state(), str(tmp / "prompt.safetensors"))
        (tmp / "training_log.json").write_text(json.dumps(curve, indent=2))
        for path in tmp.iterdir():
            path.chmod(0o644)  # MindSpore writes the graph read-only for its owner
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        manifest["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        manifest["versions"] = library_versions()
        manifest["format_version"] = FORMAT_VERSION
        write_manifest(tmp / MANIFEST, manifest)
        replace_directory(tmp, destination)
    except BaseException:  # Ctrl-C included: never leave a half bundle
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def write_manifest(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def replace_directory(new: Path, destination: Path) -> None:
    """Put `new` at `destination`; an existing bundle there is replaced whole."""
    if destination.exists():
        old = destination.parent / f".{destination.name}.old-{os.getpid()}"
        os.replace(destination, old)
        os.replace(new, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, destination)
