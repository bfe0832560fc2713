"""decoder.mindir run by MindSpore's GraphCell: generation on Ascend and GPU (and CPU), over a static KV cache.

GraphCell prepares a graph for each input shape it meets.  The graph
(builder.graphs.mindir_decoder; its signature in runtime.format's docstring) keeps
every layer's cache at a fixed capacity, so every decode step has one shape
([batch, 1] tokens over [batch, kv_heads, capacity, head_dim] caches), and
prefill pads the prompt to a multiple of `pad_multiple` tokens, as the
classifier backend pads its batches: a few shapes in all, each prepared once.

`StaticDecoderSession` has DecoderSession's interface (runtime.generate),
with its meaning: `run`'s mask covers the past and the new tokens
(past + seq), and the new tokens go to the slots right after the past.  The
caches it returns are MindSpore tensors, handed back to the next call as
they are: on a device they stay there, and only the logits come back to
numpy.  MindSpore is imported here and in mindspore_backend only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BundleError, InputError
from .format import MINDIR_CAPACITY
from .generate import prompt_arrays
from .mindspore_backend import import_mindspore, load_graph


class StaticDecoderSession:
    """decoder.mindir in GraphCell, the bundle's prompt cache in the first slots of every cache it starts."""

    # Prompts padded to multiples of 8 tokens: a few prefill shapes at a little extra padding
    # (mindspore_backend.MindSporeModel's choice for classifier batches).
    pad_multiple = 8

    def __init__(self, path: Path, prompt_cache: dict, capacity: int, device: str = "CPU"):
        ms = import_mindspore()

        self.cell = load_graph(path, device)
        self.tensor = ms.Tensor
        # The graph does not name its layers' inputs: the prompt cache has a key and a value for each layer.
        layers = sum(1 for name in prompt_cache if name.startswith("key."))
        self.prompt, self.prompt_length = prompt_arrays(prompt_cache, layers)
        self.capacity = capacity  # cache slots: the prompt cache, the prompt's tokens and the new ones
        self.shapes = set()  # (batch, seq) of every call so far: GraphCell prepared a graph for each
        self.start = (0, [])  # (batch, caches holding the prompt cache): the start of every prefill, kept

    @classmethod
    def open(cls, path: Path, prompt_cache: dict, generation: dict, device: str) -> "StaticDecoderSession":
        """How runtime.backends opens one for a bundle: the capacity is the manifest's."""
        if MINDIR_CAPACITY not in generation:
            raise BundleError(f"{path}: the manifest gives no {MINDIR_CAPACITY} for it")
        return cls(path, prompt_cache, generation[MINDIR_CAPACITY], device)

    def run(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: list) -> tuple:
        """One call: (logits [batch, vocab], the caches with the new tokens written, as MindSpore tensors).

        `mask` [batch, past + seq]: 1 for the slots to attend to (the cache's and the new tokens'), as
        DecoderSession takes it; the slots after it are empty.  The new tokens go to slots past..past+seq-1."""
        batch, seq = ids.shape
        used = mask.shape[1]
        if used > self.capacity:
            raise InputError(f"{used} positions exceed the static cache of decoder.mindir ({self.capacity} slots)")
        slots = np.zeros((batch, self.capacity), np.int32)
        slots[:, :used] = mask
        cache_position = np.arange(used - seq, used, dtype=np.int32)
        int32 = lambda a: self.tensor(np.ascontiguousarray(a, np.int32))  # noqa: E731
        self.shapes.add((batch, seq))
        out = self.cell(int32(ids), int32(positions), int32(cache_position), self.tensor(slots), *past)
        return out[0].asnumpy(), list(out[1:])

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> tuple:
        """The text `ids` [batch, seq] (`mask` 1 for its tokens, 0 for padding) after the prompt cache, padded
        with masked tokens to a multiple of pad_multiple (never past the cache's end)."""
        batch, seq = ids.shape
        p = self.prompt_length
        width = max(seq, min(-(-seq // self.pad_multiple) * self.pad_multiple, self.capacity - p))
        padded_ids, padded_mask = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
        padded_ids[:, :seq], padded_mask[:, :seq] = ids, mask
        positions = np.broadcast_to(p + np.arange(width, dtype=np.int32), (batch, width))
        full_mask = np.concatenate([np.ones((batch, p), np.int32), padded_mask], 1)
        return self.run(padded_ids, positions, full_mask, self.start_caches(batch))

    def start_caches(self, batch: int) -> list:
        """Empty caches of `batch` rows with the prompt cache in slots 0..P-1, made once per batch size: the graph
        returns new caches and never writes into the ones it is given, so every prefill can start from these."""
        if self.start[0] != batch:
            caches = []
            for prompt in self.prompt:
                cache = np.zeros((batch, prompt.shape[0], self.capacity, prompt.shape[2]), np.float32)
                cache[:, :, :self.prompt_length] = prompt
                caches.append(self.tensor(cache))
            self.start = (batch, caches)
        return self.start[1]
