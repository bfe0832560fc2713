"""Fold a trained classifier into a bundle directory, atomically.

The prompt and head are Parameters of the inference Cell; `mindspore.export`
stores them inside the graph file, so the exported model needs nothing but
token ids.  A bundle is assembled in a hidden temporary directory beside its
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

from ptbundle.runtime.bundle import FORMAT_VERSION, MANIFEST, MindSporeModel, sha256_file
from ptbundle.runtime.text import load_tokenizer, pad

PARITY_TOLERANCE = 1e-5
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


def check_parity(net, reloaded, vocab_size: int, pad_id: int) -> float:
    """Max |logit difference| between the in-memory net and the exported graph."""
    worst = 0.0
    for arrays in probe_inputs(vocab_size, pad_id):
        expected = net(*(Tensor(a) for a in arrays)).asnumpy()
        worst = max(worst, float(np.abs(reloaded(*arrays) - expected).max()))
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"exported MindIR differs from the trained model by {worst:.2e} (> {PARITY_TOLERANCE})")
    return worst


def library_versions() -> dict:
    import tokenizers

    return {"python": platform.python_version(), "mindspore": ms.__version__,
            "numpy": np.__version__, "tokenizers": tokenizers.__version__}


def write_bundle(destination, net, backbone, manifest: dict, curve: list) -> Path:
    """Write every file of the bundle, check it, then move it into place."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        mindir = export_mindir(net, tmp / "model")
        reloaded = MindSporeModel(mindir, manifest.get("device", "CPU"))
        manifest["export"] = {"mindir_max_abs_diff": check_parity(net, reloaded, backbone.config.vocab_size,
                                                                  manifest["pad_id"])}
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
