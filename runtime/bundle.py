"""Load a bundle directory and predict with it.

    from ptbundle.runtime import Bundle
    bundle = Bundle.load("exports/mr-soft")
    bundle.predict(["a gorgeous, witty film"])  # -> [Prediction(label="positive", ...)]

Nothing here imports the builder; MindSpore is imported only when the
MindSpore backend is used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .text import encode, length_sorted_batches, load_tokenizer, pad

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEVICES = ("CPU", "GPU", "Ascend")


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


def verify_files(directory: Path, manifest: dict) -> None:
    """Every file the manifest lists exists and has the recorded sha256."""
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {MANIFEST})")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...")


class MindSporeModel:
    """model.mindir run by MindSpore's GraphCell on CPU, GPU or Ascend."""

    def __init__(self, path: Path, device: str):
        import mindspore as ms

        ms.set_device(device)
        self.ms = ms
        self.cell = ms.nn.GraphCell(ms.load(str(path)))

    def __call__(self, ids, mask, types) -> np.ndarray:
        Tensor = self.ms.Tensor
        return self.cell(Tensor(ids), Tensor(mask), Tensor(types)).asnumpy()


class Bundle:
    def __init__(self, directory: Path, manifest: dict, model, tokenizer):
        self.directory = directory
        self.manifest = manifest
        self.labels = list(manifest["labels"])
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path, device: str = "CPU", verify: bool = True) -> "Bundle":
        directory = Path(path)
        if device not in DEVICES:
            raise BundleError(f"device {device!r} is not one of {', '.join(DEVICES)}")
        if not directory.is_dir():
            raise BundleError(f"{directory}: no such bundle directory")
        manifest = read_manifest(directory)
        if verify:
            verify_files(directory, manifest)
        tokenizer = load_tokenizer(directory / "tokenizer.json", manifest["max_length"])
        model = MindSporeModel(directory / "model.mindir", device)
        return cls(directory, manifest, model, tokenizer)

    @property
    def is_pair(self) -> bool:
        return bool(self.manifest.get("pair"))

    def logits(self, texts, texts_b=None, batch_size: int = 64) -> np.ndarray:
        """Logits [len(texts), num_labels] in input order."""
        texts = list(texts)
        if texts_b is not None and len(texts_b) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(texts_b)} second texts")
        out = np.zeros((len(texts), len(self.labels)), np.float32)
        if not texts:
            return out
        encodings = encode(self.tokenizer, texts, texts_b)
        for index in length_sorted_batches([len(e.ids) for e in encodings], batch_size):
            arrays = pad([encodings[i] for i in index], self.manifest["pad_id"])
            out[index] = self.model(*arrays)
        return out

    def predict(self, texts, texts_b=None, batch_size: int = 64) -> list:
        logits = self.logits(texts, texts_b, batch_size)
        probs = softmax(logits)
        return [Prediction(self.labels[int(p.argmax())], {l: float(v) for l, v in zip(self.labels, p)})
                for p in probs]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
