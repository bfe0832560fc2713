"""A backbone's sizes as plain dataclasses, read from its config.json: `EncoderConfig` (BERT-like) and
`DecoderConfig` (Llama-like).  No MindSpore here: the architectures, the checkpoint reader and the
models all read them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import BackboneError


@dataclass(frozen=True)
class EncoderConfig:
    """The encoder's sizes, as an architecture (builder.backbones.architectures) reads them from config.json."""

    model_type: str  # the architecture's key in builder.backbones.architectures
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int  # 0: the architecture has no token types (token_type_ids are ignored)
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str = "gelu"
    position_offset: int = 0  # first row of the position table (RoBERTa: pad_token_id + 1)

    @property
    def kv_width(self) -> int:
        """Width of one layer's keys (a prefix's layout): all heads."""
        return self.hidden_size

    def parameter_shapes(self) -> dict:
        """builder.models.encoder.Encoder's parameters and their shapes (tests hold this to the model)."""
        h, f = self.hidden_size, self.intermediate_size
        shapes = {"embeddings.word": (self.vocab_size, h), "embeddings.position": (self.max_positions, h)}
        if self.type_vocab_size:
            shapes["embeddings.token_type"] = (self.type_vocab_size, h)
        shapes.update({"embeddings.norm.gamma": (h,), "embeddings.norm.beta": (h,)})
        layer = {
            "attention.qkv.weight": (3 * h, h), "attention.qkv.bias": (3 * h,),
            "attention.out.weight": (h, h), "attention.out.bias": (h,),
            "attention.norm.gamma": (h,), "attention.norm.beta": (h,),
            "ffn.up.weight": (f, h), "ffn.up.bias": (f,),
            "ffn.down.weight": (h, f), "ffn.down.bias": (h,),
            "ffn.norm.gamma": (h,), "ffn.norm.beta": (h,),
        }
        for i in range(self.num_layers):
            shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
        return shapes



@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's sizes, as builder.backbones.architectures.llama reads them from config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    rms_norm_eps: float
    rope_theta: float
    tie_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple  # generation stops at any of them
    pad_token_id: int
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2), none on the output's

    position_offset = 0  # rotary positions start at 0 (check_positions reads it as of encoders)

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def parameter_shapes(self) -> dict:
        """builder.models.decoder.Decoder's parameters and their shapes."""
        h, f, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.kv_width
        shapes = {"embed_tokens.weight": (self.vocab_size, h), "norm.weight": (h,)}
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        layer = {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
        }
        if self.qkv_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        for i in range(self.num_layers):
            shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
        return shapes


def decoder_config(arch, raw: dict, source) -> DecoderConfig:
    """The DecoderConfig of a parsed Llama-family config.json; a missing, malformed or unsupported field is a
    BackboneError naming the file and the field."""

    get = functools.partial(config_field, raw, source)
    hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
    if heads < 1 or (raw.get("head_dim") is None and hidden % heads):
        raise BackboneError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    kv_heads = get("num_key_value_heads", int, heads)
    if kv_heads < 1 or heads % kv_heads:
        raise BackboneError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    refuse_unsupported(raw, source)
    # transformers 5 writes rope_theta inside rope_parameters (and no top-level key): read it there, or a
    # Qwen2.5's 1e6 would silently become the 1e4 default
    rope = raw.get("rope_parameters") or {}
    eos = raw.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(isinstance(e, int) for e in eos):
        raise BackboneError(f"{source}: field 'eos_token_id' is {raw.get('eos_token_id')!r}, not token ids")
    bos = raw.get("bos_token_id")
    pad = raw.get("pad_token_id")
    if pad is None:  # Llama checkpoints often have none; padding is masked anyway
        pad = eos[0] if eos else 0
    return DecoderConfig(
        model_type=str(raw.get("model_type")),
        vocab_size=get("vocab_size", int),
        hidden_size=hidden,
        num_layers=get("num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=get("head_dim", int, hidden // heads),
        intermediate_size=get("intermediate_size", int),
        max_positions=get("max_position_embeddings", int),
        rms_norm_eps=get("rms_norm_eps", float, 1e-6),
        rope_theta=float(rope["rope_theta"]) if "rope_theta" in rope else get("rope_theta", float, 10000.0),
        tie_embeddings=get("tie_word_embeddings", bool, False),
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=eos,
        pad_token_id=int(pad),
    )



def config_field(raw: dict, source, key: str, kind, default=None):
    """config.json's `key` as `kind` (or `default` if absent); missing or malformed is a BackboneError naming it."""
    value = raw.get(key, default)
    if value is None:
        raise BackboneError(f"{source}: missing field {key!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise BackboneError(f"{source}: field {key!r} is {value!r}, not true or false")
        return value
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise BackboneError(f"{source}: field {key!r} is {value!r}, not {kind.__name__}") from None
    if kind is int and out != value:
        raise BackboneError(f"{source}: field {key!r} is {value!r}, not an integer")
    return out


def refuse_unsupported(raw: dict, source) -> None:
    """What a Llama-family config.json may ask for that the decoder does not compute exactly: one line each."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise BackboneError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    if raw.get("rope_scaling"):
        raise BackboneError(f"{source}: rope_scaling {raw['rope_scaling']!r} is not supported (plain rotary only)")
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise BackboneError(f"{source}: rope_parameters {rope!r} is not supported (plain rotary only)")
    if raw.get("use_sliding_window") or any(t != "full_attention" for t in raw.get("layer_types") or ()):
        raise BackboneError(f"{source}: sliding-window attention is not supported (use_sliding_window, layer_types)")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise BackboneError(f"{source}: field {key!r} is true; only Llama without biases is supported")
