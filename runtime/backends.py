"""Runtime backends, a small registry: which graph file each runs, on which devices, and how to open it.

    onnxruntime   model.onnx / model.int8.onnx   CPU (the default there: light to install, quick to start)
                  decoder.onnx / decoder.int8.onnx
    mindspore     model.mindir                   CPU, GPU, Ascend (the default on GPU and Ascend)
                  decoder.mindir (a static KV cache: runtime.mindspore_generate)
    openvino      model.onnx, fp32 and bf16      CPU (optional extra; the default for bf16: the CPU's bf16 units)

A new backend is one module with a model class (opened with the graph's
path, the device, a merged bundle's task tables and a variant; called
with int32 (ids, mask, types[, task_ids]) arrays, returning float32
logits; attributes `pad_multiple`, `variants` and `variants_for(precision)`
(ways to open the graph that runtime.tuning times on the CPU at hand),
`tuned`, `version`, `token_budget`, `call_tokens` and `platform` (its name in V2 model metadata); `swap_tables(tables)` to feed a task store's shared table,
runtime.store), for generation bundles a decoder session class (the interface
of runtime.generate.DecoderSession, opened by its `open` classmethod), and
one `register(...)` line here.  Backends are imported only when used, so
the runtime pulls in neither MindSpore nor onnxruntime until a bundle
needs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .format import DECODER_GRAPHS, DEVICES, GRAPHS


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple
    files: dict  # precision ("fp32", "int8", "bf16") -> graph file in the bundle
    model_class: str  # "module:Class", imported on first use
    decoders: dict  # precision -> decoder graph file of a generation bundle
    decoder_class: str  # "module:Class" of its session, imported on first use

    def graph_file(self, precision: str, generative: bool = False) -> str:
        """The bundle's graph file this backend runs at `precision` (the decoder's, in a generation bundle)."""
        files = lambda b: b.decoders if generative else b.files  # noqa: E731
        kind = "decoder graph" if generative else "graph"
        if precision not in files(self):
            others = [b.name for b in BACKENDS.values() if precision in files(b)]
            raise BundleError(f"backend {self.name!r} has no {precision} {kind} (use backend={others[0]!r})"
                              if others else f"no backend runs {precision} {kind}s")
        return files(self)[precision]

    def open(self, path: Path, device: str, tables: dict | None = None, variant: str | None = None,
             precision: str = "fp32"):
        """The graph at `path` as a model; `tables`: a merged bundle's task tables (runtime.format), fed every call;
        `variant`: one of the model class's `variants` (runtime.tuning chooses); `precision`: one of `files`."""
        return self.load_class(self.model_class, device)(path, device, tables=tables, variant=variant,
                                                         precision=precision)

    def model_type(self, device: str):
        """The model class (its `variants_for`, `tuned`, `version`)."""
        return self.load_class(self.model_class, device)

    def open_decoder(self, path: Path, device: str, prompt_cache: dict, generation: dict):
        """A generation bundle's decoder session; `generation` is its task's details["generation"]."""
        return self.load_class(self.decoder_class, device).open(path, prompt_cache, generation, device)

    def load_class(self, name: str, device: str):
        if device not in self.devices:
            users = [b.name for b in BACKENDS.values() if device in b.devices]
            raise BundleError(f"the {self.name} backend runs on {', '.join(self.devices)};"
                              f" use backend={users[0]!r} for {device}")
        module, cls = name.split(":")
        return getattr(importlib.import_module(module, __package__), cls)


BACKENDS: dict = {}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


register(Backend("onnxruntime", ("CPU",), {"fp32": GRAPHS["onnx"], "int8": GRAPHS["onnx-int8"]},
                 ".onnx_backend:OnnxModel",
                 {"fp32": DECODER_GRAPHS["onnx"], "int8": DECODER_GRAPHS["onnx-int8"]}, ".generate:DecoderSession"))
register(Backend("mindspore", DEVICES, {"fp32": GRAPHS["mindir"]}, ".mindspore_backend:MindSporeModel",
                 {"fp32": DECODER_GRAPHS["mindir"]}, ".mindspore_generate:StaticDecoderSession"))
register(Backend("openvino", ("CPU",), {"fp32": GRAPHS["onnx"], "bf16": GRAPHS["onnx"]},
                 ".openvino_backend:OpenVinoModel", {}, ""))


PRECISIONS = ("fp32", "int8", "bf16")


def get(name: str | None, device: str, precision: str = "fp32") -> Backend:
    """The named backend, or the default for `device` and `precision` (the first registered that runs both)."""
    if device not in DEVICES:
        raise BundleError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise BundleError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if name is None:
        return next((b for b in BACKENDS.values() if device in b.devices and precision in b.files),
                    next(b for b in BACKENDS.values() if device in b.devices))
    if name not in BACKENDS:
        raise BundleError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
