"""Llama (and SmolLM2, its small sibling): the reference decoder layout, read into builder.models.decoder.Decoder.

Our parameter names are transformers' without "model.", so the map is the
identity but for that prefix; `lm_head.weight` exists only in untied
checkpoints (SmolLM2 ties it to the embeddings).
"""

from .base import Architecture
from ..configs import decoder_config

LAYER = "layers.{i}."
WEIGHTS = {"embed_tokens.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
           "lm_head.weight": "lm_head.weight"}
WEIGHTS.update({LAYER + name: LAYER + name for name in (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")})

LLAMA = Architecture(model_type="llama", prefix="model.", weights=WEIGHTS, family="decoder", read_config=decoder_config,
                     embeddings="embed_tokens.weight")
