"""Pooling: how the head reads the encoder's states, a small registry.

Each entry is one class with both halves of it: the MindSpore Cell that
trains (and exports to MindIR), and `onnx`, which writes the same
computation into the ONNX graph.  The export's parity check holds the two
to the same result.  A new pooling is one class here and one line in
`POOLING` (and its name in recipe.POOLINGS, so pt-build offers it).

    mean   mean of the text tokens' states (what sentence-transformers
           models such as all-MiniLM-L6-v2 were trained with); the virtual
           tokens steer those states, they are not text
    cls    position 0 through the pooler, tanh(W h[:, 0] + b); with a soft
           prompt position 0 is the first virtual token, as in PEFT

`offset` is the number of states in front of this task's prompt (zero in a
bundle of one task).  A merged bundle (builder.models.classifier.MultiTaskClassifier)
pools row by row: `rows` / `onnx_rows` read each row's own parameters,
gathered from the task table by the row's task (`table_params` names them, in
the order `params` holds them; a [in, out] weight is stored transposed), and `first`, a [batch, states]
one-hot of the state a row's first-token pooling reads.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from onnx import TensorProto

from .onnx_ops import linear


def mean_of(text, text_mask):
    """The mean of the unmasked rows of `text` [b, s, h]."""
    m = text_mask.astype(ms.float32).expand_dims(2)
    return (text * m).sum(1) / ops.maximum(m.sum(1), 1e-9)


def text_states(states, text_mask):
    """The text's states: the last text_mask.shape[1] of `states` (prompt states come first)."""
    return states[:, states.shape[1] - text_mask.shape[1] :]


class MeanPooling(nn.Cell):
    table_params = ()

    def __init__(self, hidden: int, num_virtual_tokens: int, offset: int = 0):
        super().__init__()
        self.text_start = offset + num_virtual_tokens

    def construct(self, states, attention_mask):
        return mean_of(states[:, self.text_start :], attention_mask)

    def params(self) -> dict:
        return {}

    @staticmethod
    def rows(states, text_mask, first, params: tuple):
        return mean_of(text_states(states, text_mask), text_mask)

    @staticmethod
    def onnx(g, weights: dict, states: str, mask: str, num_virtual_tokens: int, offset: int = 0,
             prefix: str = "") -> str:
        text = g.op("Slice", [states, g.const("text_start", [offset + num_virtual_tokens], np.int64),
                              g.const("text_end", [np.iinfo(np.int64).max], np.int64), g.const("axis1", [1], np.int64)])
        return masked_mean(g, text, mask)

    @staticmethod
    def onnx_rows(g, states: str, mask: str, first: str, params: tuple) -> str:
        # The text is the last seq states: slice from -seq (Shape of the mask's second axis).
        seq = g.op("Gather", [g.op("Shape", [mask]), g.const("one", [1], np.int64)], axis=0)
        text = g.op("Slice", [states, g.op("Neg", [seq]), g.const("text_end", [np.iinfo(np.int64).max], np.int64),
                              g.const("axis1", [1], np.int64)])
        return masked_mean(g, text, mask)


def masked_mean(g, text: str, mask: str) -> str:
    m = g.op("Unsqueeze", [g.op("Cast", [mask], to=TensorProto.FLOAT), g.const("axis2", [2], np.int64)])
    total = g.op("ReduceSum", [g.op("Mul", [text, m]), g.const("axis1_sum", [1], np.int64)], keepdims=0)
    count = g.op("ReduceSum", [m, g.const("axis1_count", [1], np.int64)], keepdims=0)
    return g.op("Div", [total, g.op("Max", [count, g.const("count_floor", 1e-9, np.float32)])])


class ClsPooling(nn.Cell):
    """BERT's pooler (RoBERTa's classification head dense plays the same part)."""

    table_params = ("pooler.weight", "pooler.bias")

    def __init__(self, hidden: int, num_virtual_tokens: int, offset: int = 0):
        super().__init__()
        self.first = offset
        self.dense = nn.Dense(hidden, hidden, activation="tanh")

    def construct(self, states, attention_mask):
        return self.dense(states[:, self.first])

    def params(self) -> dict:
        return {"pooler.weight": self.dense.weight, "pooler.bias": self.dense.bias}

    @staticmethod
    def rows(states, text_mask, first, params: tuple):
        weight, bias = params  # table_params' order
        picked = (states[:, : first.shape[1]] * first.expand_dims(2)).sum(1, keepdims=True)  # [b, 1, h]
        return ops.tanh(ops.matmul(picked, weight).squeeze(1) + bias)

    @staticmethod
    def onnx_rows(g, states: str, mask: str, first: str, params: tuple) -> str:
        weight, bias = params
        width = g.op("Shape", [first], start=1, end=2)
        head = g.op("Slice", [states, g.const("zero_start", [0], np.int64), width, g.const("axis1", [1], np.int64)])
        picked = g.op("ReduceSum", [g.op("Mul", [head, g.op("Unsqueeze", [first, g.const("axis2", [2], np.int64)])]),
                                    g.const("axis1", [1], np.int64)], keepdims=1)  # [b, 1, h]
        product = g.op("Squeeze", [g.op("MatMul", [picked, weight], name="pooler"), g.const("axis1", [1], np.int64)])
        return g.op("Tanh", [g.op("Add", [product, bias])])

    @staticmethod
    def onnx(g, weights: dict, states: str, mask: str, num_virtual_tokens: int, offset: int = 0,
             prefix: str = "") -> str:
        first = g.op("Gather", [states, g.const("first_state", offset, np.int64)], axis=1)
        return g.op("Tanh", [linear(g, weights, prefix + "pooler", first)])


POOLING = {"mean": MeanPooling, "cls": ClsPooling}
