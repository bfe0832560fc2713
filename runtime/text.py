"""Turning texts into padded id arrays, the one way both training and serving do it.

The builder imports this module too, so a bundle tokenizes at serving time
exactly as it did during training.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

PAD_MULTIPLE = 8  # few distinct shapes for backends that prepare per shape, little extra padding


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


def pad(encodings, pad_id: int, multiple: int = PAD_MULTIPLE):
    """Encodings -> (input_ids, attention_mask, token_type_ids), int32 [batch, seq]."""
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


def length_sorted_batches(lengths, batch_size: int) -> list:
    """Index batches in order of length: little padding, results put back by index."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
