"""Qwen2 (Qwen2.5): the Llama layout plus biases on q_proj, k_proj and v_proj (none on o_proj or the MLP)."""

import dataclasses

from .base import Architecture
from .llama import LAYER, WEIGHTS as LLAMA_WEIGHTS
from ..configs import decoder_config

WEIGHTS = {**LLAMA_WEIGHTS, **{LAYER + f"self_attn.{p}_proj.bias": LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"}}


def qwen2_config(arch, raw: dict, source):
    """A Qwen2 config.json carries no flag for its biases: the architecture has them."""
    return dataclasses.replace(decoder_config(arch, raw, source), qkv_bias=True)


QWEN2 = Architecture(model_type="qwen2", prefix="model.", weights=WEIGHTS, family="decoder", read_config=qwen2_config,
                     embeddings="embed_tokens.weight")
