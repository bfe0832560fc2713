"""Forward passes outside the train step: the lower layers cached once per text, and scoring a split."""

from __future__ import annotations

import tempfile

import numpy as np
from mindspore import nn

from ptbundle.runtime.bundle import batched_logits
from ptbundle.runtime.metrics import classification_metrics
from ptbundle.runtime.text import batch_indices, encode, pad

from ..families import family_of
from ..graphs.runners import TRAIN_PAD_MULTIPLE, CellModel
from ..models.classifier import PromptClassifier
from .loop import progress


class Lower(nn.Cell):
    """A PromptClassifier's `lower` pass: the states entering the layer its prompt starts at."""

    def __init__(self, net: PromptClassifier):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, input_ids, attention_mask, token_type_ids):
        return self.net.lower(input_ids, attention_mask, token_type_ids)[0]


class Upper(nn.Cell):
    """A PromptClassifier from the layer its prompt starts at: cached states and their mask in, logits out."""

    def __init__(self, net: PromptClassifier):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, states, attention_mask):
        return self.net.head(self.net.upper_features(states, attention_mask))

    def prompt_params(self) -> dict:
        return self.net.prompt_params()


class LayerCache:
    """The states entering a prompt's first layer, computed once per text.

    The layers below a late prompt (or a prefix that starts above layer 0)
    never see it, so their output is the same every epoch: training runs
    them once here and then pays only for the layers above (Liu et al.
    2022, Late Prompt Tuning).  The texts' states are kept unpadded, one
    [tokens, hidden] float32 table (MR's 8,528 training texts with MiniLM:
    about 400 MB); past `memory_limit` bytes the table is a memory-mapped
    file in a temporary directory instead, so a large corpus costs disk,
    not RAM.
    """

    MEMORY_LIMIT = 2 << 30

    def __init__(self, net: PromptClassifier, encodings, pad_id: int, batch_size: int = 64,
                 memory_limit: int = MEMORY_LIMIT, lower=None, label: str = "lower layers"):
        """`lower`: runs net.lower as the runtime calls a model (default: the MindSpore Cell; a decoder's
        runs in onnxruntime: builder.families, lower_model)."""
        lower = lower or CellModel(Lower(net), batch_size)
        self.lengths = [len(e.ids) for e in encodings]
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        shape = (int(self.starts[-1]), net.hidden_size)
        if shape[0] * shape[1] * 4 > memory_limit:
            self._directory = tempfile.TemporaryDirectory(prefix="ptbundle-layer-cache-")  # removed with the cache
            self.table = np.lib.format.open_memmap(f"{self._directory.name}/states.npy", "w+", np.float32, shape)
        else:
            self.table = np.empty(shape, np.float32)
        for index in progress(batch_indices(self.lengths, batch_size), label, lambda: ""):
            # onnxruntime takes any length (pad_multiple 1): padding to 16 cost SmolLM2 about 15% more tokens
            out = lower(*pad([encodings[i] for i in index], pad_id, lower.pad_multiple))
            for row, i in enumerate(index):
                self.table[self.starts[i] : self.starts[i + 1]] = out[row, : self.lengths[i]]

    def batch(self, index) -> tuple:
        """(states [b, seq, hidden] zero-padded, mask [b, seq] int32), seq a multiple of TRAIN_PAD_MULTIPLE."""
        longest = max(self.lengths[i] for i in index)
        seq = -(-longest // TRAIN_PAD_MULTIPLE) * TRAIN_PAD_MULTIPLE
        states = np.zeros((len(index), seq, self.table.shape[1]), np.float32)
        mask = np.zeros((len(index), seq), np.int32)
        for row, i in enumerate(index):
            states[row, : self.lengths[i]] = self.table[self.starts[i] : self.starts[i + 1]]
            mask[row, : self.lengths[i]] = 1
        return states, mask

    def logits(self, upper: Upper, width: int, batch_size: int = 64) -> np.ndarray:
        """upper over every cached text, [n, width] in input order."""
        model = CellModel(upper, batch_size)
        out = np.zeros((len(self.lengths), width), np.float32)
        for index in batch_indices(self.lengths, batch_size):
            out[index] = model(*self.batch(index))
        return out


def cell_logits(cell, encodings, pad_id: int, width: int, batch_size: int = 64) -> np.ndarray:
    """cell(ids, mask, types) -> [n, width] in input order, batched as the runtime batches."""
    return batched_logits(CellModel(cell, batch_size), encodings, pad_id, width, batch_size)


def evaluate(net, encodings, gold, pad_id: int, num_labels: int) -> dict:
    if not encodings:
        return {}
    predicted = batched_logits(family_of(net).inference_model(net), encodings, pad_id, num_labels).argmax(-1)
    return classification_metrics(predicted, gold, num_labels)


def encode_split(tokenizer, dataset, split: str, template=None):
    """(encodings, label ids) of one split, tokenized as the bundle will tokenize."""
    examples = getattr(dataset, split)
    texts_b = [e.text_b for e in examples] if dataset.is_pair else None
    return encode(tokenizer, [e.text for e in examples], texts_b, template), np.array(dataset.label_ids(examples))


