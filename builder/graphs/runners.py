"""A model called as the runtime calls a backend (int32 arrays in, float32 numpy out), outside a bundle:
a MindSpore Cell compiled per shape (`CellModel`), or a net's ONNX graph in a scratch directory (`ScratchOnnx`)."""

from __future__ import annotations

import tempfile

import numpy as np
from mindspore import Tensor

from ptbundle.runtime.onnx_backend import OnnxModel

from .onnx_decoder_classifier import export_decoder_classifier

# MindSpore's CPU backend keeps 1.5-3 GB of buffers per compiled (batch, seq)
# train graph (measured: 1.2 GB at seq 52, 2.8 GB at seq 100), so training
# pads to multiples of 16: MR then needs 5 graphs instead of 9 (20 GB, OOM).
TRAIN_PAD_MULTIPLE = 16


class CellModel:
    """A MindSpore Cell called as the runtime calls a backend: int32 arrays in, float32 numpy out.

    Rows are repeated up to a fixed batch size and sequences padded to
    multiples of TRAIN_PAD_MULTIPLE, so each length compiles one graph.
    """

    pad_multiple = TRAIN_PAD_MULTIPLE
    token_budget = None  # whole batches (runtime.bundle.batched_logits): it pads them to one size anyway
    call_tokens = None  # likewise: not cut into calls by length

    def __init__(self, cell, batch_size: int):
        cell.set_train(False)
        self.cell, self.batch_size = cell, batch_size

    def __call__(self, *arrays) -> np.ndarray:
        n = len(arrays[0])
        filled = [np.concatenate([a, np.repeat(a[-1:], self.batch_size - n, 0)]) for a in arrays]
        return self.cell(*(Tensor(a) for a in filled)).asnumpy()[:n]


class ScratchOnnx:
    """A net's ONNX graph in a temporary directory, called as the runtime calls a model.

    A decoder's forward passes outside the train step run here: MindSpore's
    CPU backend keeps GBs of buffers per compiled (batch, seq) graph, which a
    135M decoder multiplies (its layer cache over MR's training texts went
    past 17 GB and was killed), while onnxruntime takes any shape in one
    session, faster (builder.training.hard.FeatureCache does the same for features).
    """

    def __init__(self, net, lower: bool = False):
        self.directory = tempfile.TemporaryDirectory(prefix="ptbundle-forward-")
        path = f"{self.directory.name}/model.onnx"
        export_decoder_classifier(net, path, lower=lower)
        self.model = OnnxModel(path)
        self.pad_multiple = self.model.pad_multiple
        self.token_budget = self.call_tokens = None

    def __call__(self, *arrays):
        return self.model(*arrays)

