"""Prompt methods: what is learned in front of (or inside) the frozen encoder, a small registry.

Each entry is one Cell with both halves: `construct` (MindSpore: trains and
exports to MindIR) and `onnx` (writes the same step into the ONNX graph),
held to the same result by the export's parity check.  A method takes the
word embeddings, attention mask and token types of the text and returns
those the encoder reads.  A new method is one class here and one line in
`PROMPTS`; its Parameters keep their own names (no cell prefix), which are
the names the bundle's prompt.safetensors and PEFT use.

    none            the text as tokenized (hard prompts: the template is text)
    prompt-tuning   Lester et al. 2021 / PEFT prompt tuning: virtual tokens
                    before [CLS] / <s>; the mask gets ones, token types zeros,
                    and position embeddings count the virtual tokens too
"""

from __future__ import annotations

import numpy as np
import mindspore as ms  # noqa: F401  (before onnx: see onnx_export)
from mindspore import Parameter, nn, ops


class NoPrompt(nn.Cell):
    virtual_tokens = 0  # states in front of the text (pooling skips them; positions count them)

    def __init__(self, hidden: int, num_virtual_tokens: int = 0):
        super().__init__(auto_prefix=False)

    def construct(self, embeds, attention_mask, token_type_ids):
        return embeds, attention_mask, token_type_ids

    def params(self) -> dict:
        return {}

    @staticmethod
    def onnx(g, weights: dict, embeds: str, mask: str, types: str | None, batch: str, num_virtual_tokens: int):
        return embeds, mask, types


class PromptTuning(nn.Cell):
    def __init__(self, hidden: int, num_virtual_tokens: int):
        super().__init__(auto_prefix=False)
        self.virtual_tokens = num_virtual_tokens
        self.embeddings = Parameter(np.zeros((num_virtual_tokens, hidden), np.float32), name="prompt_embeddings")

    def construct(self, embeds, attention_mask, token_type_ids):
        b, p = embeds.shape[0], self.virtual_tokens
        prompt = ops.broadcast_to(self.embeddings.expand_dims(0), (b, p, self.embeddings.shape[1]))
        return (ops.concat((prompt, embeds), 1),
                ops.concat((ops.ones((b, p), attention_mask.dtype), attention_mask), 1),
                ops.concat((ops.zeros((b, p), token_type_ids.dtype), token_type_ids), 1))

    def params(self) -> dict:
        return {"prompt_embeddings": self.embeddings}

    @staticmethod
    def onnx(g, weights: dict, embeds: str, mask: str, types: str | None, batch: str, num_virtual_tokens: int):
        p = num_virtual_tokens
        hidden = weights["prompt_embeddings"].shape[1]
        prompt_shape = g.op("Concat", [batch, g.const("prompt_len_hidden", [p, hidden], np.int64)], axis=0)
        prompt = g.op("Expand", [g.const("prompt_embeddings", weights["prompt_embeddings"][None]), prompt_shape])
        embeds = g.op("Concat", [prompt, embeds], axis=1)
        prefix_shape = g.op("Concat", [batch, g.const("prompt_len", [p], np.int64)], axis=0)
        ones = g.op("Expand", [g.const("prefix_ones", [[1]], np.int32), prefix_shape])
        mask = g.op("Concat", [ones, mask], axis=1)
        if types is not None:  # an architecture without token types has none to extend
            zeros = g.op("Expand", [g.const("prefix_zeros", [[0]], np.int32), prefix_shape])
            types = g.op("Concat", [zeros, types], axis=1)
        return embeds, mask, types


PROMPTS = {"none": NoPrompt, "prompt-tuning": PromptTuning}


def method_for(num_virtual_tokens: int) -> str:
    """The method a recipe asks for (today: a shallow prompt when it has virtual tokens)."""
    return "prompt-tuning" if num_virtual_tokens > 0 else "none"
