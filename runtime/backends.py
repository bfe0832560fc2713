"""Runtime backends, a small registry: which graph file each runs, on which devices, and how to open it.

    onnxruntime   model.onnx / model.int8.onnx   CPU (the default there: light to install, quick to start)
    mindspore     model.mindir                   CPU, GPU, Ascend (the default on GPU and Ascend)

A new backend is one module with a model class (called with int32
(ids, mask, types) arrays, returning float32 logits; a `pad_multiple`
attribute) and one `register(...)` line here.  Backends are imported only
when used, so the runtime pulls in neither MindSpore nor onnxruntime until
a bundle needs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .format import DEVICES, GRAPHS


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple
    files: dict  # precision ("fp32", "int8") -> graph file in the bundle
    model_class: str  # "module:Class", imported on first use

    def graph_file(self, precision: str) -> str:
        if precision not in self.files:
            others = [b.name for b in BACKENDS.values() if precision in b.files]
            raise BundleError(f"backend {self.name!r} has no {precision} graph (use backend={others[0]!r})"
                              if others else f"no backend runs {precision} graphs")
        return self.files[precision]

    def open(self, path: Path, device: str):
        if device not in self.devices:
            users = [b.name for b in BACKENDS.values() if device in b.devices]
            raise BundleError(f"the {self.name} backend runs on {', '.join(self.devices)};"
                              f" use backend={users[0]!r} for {device}")
        module, cls = self.model_class.split(":")
        return getattr(importlib.import_module(module, __package__), cls)(path, device)


BACKENDS: dict = {}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


register(Backend("onnxruntime", ("CPU",), {"fp32": GRAPHS["onnx"], "int8": GRAPHS["onnx-int8"]},
                 ".onnx_backend:OnnxModel"))
register(Backend("mindspore", DEVICES, {"fp32": GRAPHS["mindir"]}, ".mindspore_backend:MindSporeModel"))


def get(name: str | None, device: str) -> Backend:
    """The named backend, or the default for `device` (the first registered that runs there)."""
    if device not in DEVICES:
        raise BundleError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if name is None:
        return next(b for b in BACKENDS.values() if device in b.devices)
    if name not in BACKENDS:
        raise BundleError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
