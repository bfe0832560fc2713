"""Turning texts into padded id arrays, the one way both training and serving do it.

The builder imports this module too, so a bundle tokenizes at serving time
exactly as it did during training.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

def load_tokenizer(path, max_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # we pad per batch, to the batch's longest row
    tokenizer.enable_truncation(max_length)
    return tokenizer


def encode(tokenizer: Tokenizer, texts, texts_b=None, template=None) -> list:
    """Token id lists (with special tokens, truncated), one per text or pair.

    With a hard-prompt `template` (runtime.template.Template) the inputs are
    put into it in token space.
    """
    if template is not None:
        return template.encode(tokenizer, texts, texts_b)
    inputs = list(texts) if texts_b is None else list(zip(texts, texts_b))
    return tokenizer.encode_batch(inputs)


def pad(encodings, pad_id: int, multiple: int = 1):
    """Encodings -> (input_ids, attention_mask, token_type_ids), int32 [batch, seq].

    seq is the longest row rounded up to `multiple` (a backend that prepares
    per input shape wants few distinct shapes).
    """
    longest = max(len(e.ids) for e in encodings)
    seq = -(-longest // multiple) * multiple
    ids = np.full((len(encodings), seq), pad_id, np.int32)
    mask = np.zeros((len(encodings), seq), np.int32)
    types = np.zeros((len(encodings), seq), np.int32)
    for row, e in enumerate(encodings):
        n = len(e.ids)
        ids[row, :n] = e.ids
        mask[row, :n] = 1
        types[row, :n] = e.type_ids
    return ids, mask, types


def batch_indices(lengths, batch_size: int, by_length: bool = True) -> list:
    """Index arrays of the batches: in order of length (little padding; results
    are put back by index), or consecutive in input order."""
    order = np.argsort(np.asarray(lengths), kind="stable") if by_length else np.arange(len(lengths))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
