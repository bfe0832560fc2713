"""Load a bundle directory and predict with it.

    from ptbundle.runtime import Bundle
    bundle = Bundle.load("exports/mr-soft")
    bundle.predict(["a gorgeous, witty film"])  # -> [Prediction(label="positive", ...)]

Two backends run the same folded graph: onnxruntime (`model.onnx`, the
default on CPU: light to install, quick to start) and MindSpore
(`model.mindir`, the default on GPU and Ascend).  Nothing here imports the
builder; MindSpore is imported only when its backend is used.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .template import Template, TemplateError
from .text import batch_indices, encode, load_tokenizer, pad

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEVICES = ("CPU", "GPU", "Ascend")
BACKENDS = ("onnxruntime", "mindspore")


class BundleError(ValueError):
    """A bundle that cannot be loaded, with the reason."""


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict  # label -> probability

    def to_dict(self) -> dict:
        return {"label": self.label, "probabilities": self.probabilities}


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(f"{directory}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version!r}, this runtime reads {FORMAT_VERSION}")
    for field in ("labels", "files", "max_length", "pad_id"):
        if field not in manifest:
            raise BundleError(f"{path}: missing field {field!r}")
    return manifest


def verify_files(directory: Path, manifest: dict, names=None) -> None:
    """The files (default: every file the manifest lists) exist and have the recorded sha256."""
    for name in names or manifest["files"]:
        if name not in manifest["files"]:
            raise BundleError(f"{directory}: this bundle has no {name}")
        expected = manifest["files"][name]
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {MANIFEST})")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...")


def default_backend(device: str) -> str:
    return "onnxruntime" if device == "CPU" else "mindspore"


def graph_file(manifest: dict, backend: str, device: str, int8: bool) -> str:
    if backend == "mindspore":
        if int8:
            raise BundleError("int8 is an ONNX graph: use backend='onnxruntime'")
        return "model.mindir"
    if device != "CPU":
        raise BundleError(f"the onnxruntime backend runs on CPU; use backend='mindspore' for {device}")
    name = "model.int8.onnx" if int8 else "model.onnx"
    if name not in manifest["files"]:
        hint = " (build it with pt-build export --quantize int8)" if int8 else ""
        raise BundleError(f"this bundle has no {name}{hint}")
    return name


def open_model(path: Path, backend: str, device: str):
    if backend == "mindspore":
        from .mindspore_backend import MindSporeModel

        return MindSporeModel(path, device)
    from .onnx_backend import OnnxModel

    return OnnxModel(path)


class Bundle:
    def __init__(self, directory: Path, manifest: dict, model, tokenizer):
        self.directory = directory
        self.manifest = manifest
        self.labels = list(manifest["labels"])
        self.model = model
        self.tokenizer = tokenizer
        self.template = read_template(manifest, directory)

    @classmethod
    def load(cls, path, device: str = "CPU", backend: str | None = None, int8: bool = False,
             verify: bool = True) -> "Bundle":
        """Open a bundle; backend defaults to onnxruntime on CPU, MindSpore elsewhere."""
        directory = Path(path)
        if device not in DEVICES:
            raise BundleError(f"device {device!r} is not one of {', '.join(DEVICES)}")
        backend = backend or default_backend(device)
        if backend not in BACKENDS:
            raise BundleError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if not directory.is_dir():
            raise BundleError(f"{directory}: no such bundle directory")
        manifest = read_manifest(directory)
        graph = graph_file(manifest, backend, device, int8)
        with ThreadPoolExecutor(1) as pool:
            # Hash what this process reads (the other graphs may be large and
            # unused) on a second thread while the graph loads: hashlib lets go
            # of the GIL, and a cold start is mostly these two.
            check = pool.submit(verify_files, directory, manifest, ["tokenizer.json", graph]) if verify else None
            try:
                tokenizer = load_tokenizer(directory / "tokenizer.json", manifest["max_length"])
                model = open_model(directory / graph, backend, device)
            except Exception:
                if check is not None:
                    check.result()  # a missing or altered file explains the failure best
                raise
            if check is not None:
                check.result()  # a mismatch raises here, before the bundle is handed out
        return cls(directory, manifest, model, tokenizer)

    @property
    def is_pair(self) -> bool:
        return bool(self.manifest.get("pair"))

    def logits(self, texts, texts_b=None, batch_size: int = 64, sort_by_length: bool = True) -> np.ndarray:
        """Logits [len(texts), num_labels] in input order.

        Batches group texts of similar length (less padding) unless
        `sort_by_length=False`, which runs consecutive texts together.
        """
        texts = list(texts)
        if texts_b is not None and len(texts_b) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(texts_b)} second texts")
        return batched_logits(self.model, self.encode(texts, texts_b), self.manifest["pad_id"], len(self.labels),
                              batch_size, sort_by_length)

    def predict(self, texts, texts_b=None, batch_size: int = 64, sort_by_length: bool = True) -> list:
        logits = self.logits(texts, texts_b, batch_size, sort_by_length)
        return [Prediction(self.labels[int(p.argmax())], {l: float(v) for l, v in zip(self.labels, p)})
                for p in softmax(logits)]

    def encode(self, texts, texts_b=None) -> list:
        """Token encodings as the graph receives them (the template applied, if any)."""
        return encode(self.tokenizer, texts, texts_b, self.template)


def bundle_kind(manifest: dict) -> str:
    """'soft', or 'hard zero-shot' / 'hard probe': how tables name a bundle."""
    kind = manifest.get("kind", "?")
    return f"{kind} {manifest['head']}" if kind == "hard" and manifest.get("head") else kind


def read_template(manifest: dict, directory: Path):
    """A hard-prompt bundle's template (None for a soft prompt): inputs go into it before the graph."""
    if not manifest.get("template"):
        return None
    try:
        return Template.parse(manifest["template"], pair=bool(manifest.get("pair")))
    except TemplateError as e:
        raise BundleError(f"{directory / MANIFEST}: {e}") from e


def batched_logits(model, encodings, pad_id: int, num_labels: int, batch_size: int = 64,
                   sort_by_length: bool = True) -> np.ndarray:
    """Run `model` over batches (length-sorted by default); logits come back in input order."""
    out = np.zeros((len(encodings), num_labels), np.float32)
    for index in batch_indices([len(e.ids) for e in encodings], batch_size, sort_by_length):
        out[index] = model(*pad([encodings[i] for i in index], pad_id, model.pad_multiple))
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
