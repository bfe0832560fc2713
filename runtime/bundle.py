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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backends
from .errors import BundleError, TemplateError
from .format import MANIFEST, TOKENIZER, Manifest, verify_files
from .template import Template
from .text import batch_indices, encode, load_tokenizer, pad


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict  # label -> probability

    def to_dict(self) -> dict:
        return {"label": self.label, "probabilities": self.probabilities}


class Bundle:
    def __init__(self, directory: Path, manifest: Manifest, model, tokenizer):
        self.directory = directory
        self.manifest = manifest
        self.labels = list(manifest.labels)
        self.model = model
        self.tokenizer = tokenizer
        self.template = read_template(manifest, directory)

    @classmethod
    def load(cls, path, device: str = "CPU", backend: str | None = None, int8: bool = False,
             verify: bool = True) -> "Bundle":
        """Open a bundle; backend defaults to onnxruntime on CPU, MindSpore elsewhere (runtime.backends)."""
        directory = Path(path)
        runner = backends.get(backend, device)
        if not directory.is_dir():
            raise BundleError(f"{directory}: no such bundle directory")
        manifest = Manifest.read(directory)
        graph = runner.graph_file("int8" if int8 else "fp32")
        if graph not in manifest.files:
            hint = " (build it with pt-build export --quantize int8)" if int8 else ""
            raise BundleError(f"{directory}: this bundle has no {graph}{hint}")
        with ThreadPoolExecutor(1) as pool:
            # Hash what this process reads (the other graphs may be large and
            # unused) on a second thread while the graph loads: hashlib lets go
            # of the GIL, and a cold start is mostly these two.
            check = pool.submit(verify_files, directory, manifest, [TOKENIZER, graph]) if verify else None
            try:
                tokenizer = load_tokenizer(directory / TOKENIZER, manifest.max_length)
                model = runner.open(directory / graph, device)
            except Exception:
                if check is not None:
                    check.result()  # a missing or altered file explains the failure best
                raise
            if check is not None:
                check.result()  # a mismatch raises here, before the bundle is handed out
        return cls(directory, manifest, model, tokenizer)

    @property
    def is_pair(self) -> bool:
        return self.manifest.pair

    def logits(self, texts, texts_b=None, batch_size: int = 64, sort_by_length: bool = True) -> np.ndarray:
        """Logits [len(texts), num_labels] in input order.

        Batches group texts of similar length (less padding) unless
        `sort_by_length=False`, which runs consecutive texts together.
        """
        texts = list(texts)
        if texts_b is not None and len(texts_b) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(texts_b)} second texts")
        return batched_logits(self.model, self.encode(texts, texts_b), self.manifest.pad_id, len(self.labels),
                              batch_size, sort_by_length)

    def predict(self, texts, texts_b=None, batch_size: int = 64, sort_by_length: bool = True) -> list:
        logits = self.logits(texts, texts_b, batch_size, sort_by_length)
        return [Prediction(self.labels[int(p.argmax())], {l: float(v) for l, v in zip(self.labels, p)})
                for p in softmax(logits)]

    def encode(self, texts, texts_b=None) -> list:
        """Token encodings as the graph receives them (the template applied, if any)."""
        return encode(self.tokenizer, texts, texts_b, self.template)


def read_template(manifest: Manifest, directory: Path):
    """A hard-prompt bundle's template (None for a soft prompt): inputs go into it before the graph."""
    if not manifest.template:
        return None
    try:
        return Template.parse(manifest.template, pair=manifest.pair)
    except TemplateError as e:
        raise BundleError(f"{directory / MANIFEST}: field 'template': {e}") from e


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
