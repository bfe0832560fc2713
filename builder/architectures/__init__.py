"""Checkpoint architectures as small declarative adapters, keyed by config.json's `model_type`.

An `Architecture` says how one family's Hugging Face checkpoint maps onto
one of two MindSpore models, its `family`: the `Encoder` (builder.model,
BERT-like) or the `Decoder` (builder.decoder, Llama-like).  For an encoder: which config.json keys give
the `EncoderConfig`, where positions start, whether it takes token types,
its padding side and special tokens, and, for each of the Encoder's
parameters, the checkpoint tensor(s) it is made of.  `weight_map` turns an
architecture and a config into the full list of `Weight`s; the shape check
and the loading (builder.backbone) and the ONNX writer (builder.onnx_export)
all read it, so every name is written once, in the architecture's file.

Adding an architecture: a file beside bert.py that builds an `Architecture`,
and one `register(...)` line at the end of this one (or `register` from
anywhere, e.g. a test, before the backbone is loaded).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Callable

from ..errors import BackboneError
from ..model import EncoderConfig

# EncoderConfig field -> config.json key, as BERT (and most of its family) names them.
# A key of None: config.json does not carry it, the architecture's default is used.
HF_CONFIG = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_positions": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
    "pad_token_id": "pad_token_id",
    "hidden_act": "hidden_act",
}
HF_DEFAULTS = {"type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_act": "gelu"}


def no_offset(cfg: EncoderConfig) -> int:
    return 0


@dataclass(frozen=True)
class Architecture:
    """One checkpoint family: everything that differs between BERT-like encoders, and nothing else.

    `weights` maps each of our parameter names (the Encoder's, as
    `Encoder.parameters_and_names()` gives them; "{i}" stands for the layer
    number) to the checkpoint tensor it is (a name), or to the tensors that
    are concatenated along axis 0 to make it (a tuple of names: the fused
    query/key/value projection).  Checkpoint names are given without
    `prefix`, which is stripped from the file's names where present.
    """

    model_type: str
    weights: dict
    prefix: str = ""  # e.g. "bert.": transformers saves BertModel's tensors with or without it
    config: dict = field(default_factory=lambda: dict(HF_CONFIG))  # EncoderConfig field -> config.json key
    defaults: dict = field(default_factory=lambda: dict(HF_DEFAULTS))  # for keys config.json may lack
    position_offset: Callable[[EncoderConfig], int] = no_offset  # first row of the position table
    token_types: bool = True  # False: no token-type embeddings (token_type_ids are ignored)
    padding_side: str = "right"
    special_tokens: dict = field(default_factory=dict)  # role (cls, sep, pad, ...) -> token in tokenizer.json
    pooler: tuple | None = None  # (weight, bias) of the checkpoint's pooler dense, if it may have one
    family: str = "encoder"  # or "decoder": builder.decoder's config reader, parameters and model

    @property
    def is_decoder(self) -> bool:
        return self.family == "decoder"


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Make `arch` loadable (a later registration of the same model_type replaces it)."""
    ARCHITECTURES[arch.model_type] = arch
    return arch


def get(model_type) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except (KeyError, TypeError):
        raise BackboneError(f"model_type {model_type!r} is not supported "
                            f"(supported: {', '.join(sorted(ARCHITECTURES))})") from None


def config_from(arch: Architecture, raw: dict, source):
    """The EncoderConfig (or a decoder's DecoderConfig) of a parsed config.json; a missing or malformed field is
    a BackboneError."""
    if arch.is_decoder:
        from ..decoder import decoder_config

        return decoder_config(raw, source)
    types = typing.get_type_hints(EncoderConfig)
    values = {"model_type": arch.model_type}
    for name, key in arch.config.items():
        if name == "type_vocab_size" and not arch.token_types:
            continue
        if key is not None and key in raw and raw[key] is not None:
            try:
                values[name] = types[name](raw[key])
            except (TypeError, ValueError):
                raise BackboneError(f"{source}: field {key!r} is {raw[key]!r}, not {types[name].__name__}") from None
        elif name in arch.defaults:
            values[name] = arch.defaults[name]
        else:
            raise BackboneError(f"{source}: missing field {key!r}")
    if not arch.token_types:
        values["type_vocab_size"] = 0
    try:
        cfg = EncoderConfig(**values)
    except TypeError as e:  # an architecture whose `config` leaves out a field
        raise BackboneError(f"{source}: architecture {arch.model_type!r} gives no value for a field ({e})") from None
    if cfg.hidden_act != "gelu":
        raise BackboneError(f"{source}: hidden_act {cfg.hidden_act!r} is not supported (only 'gelu')")
    if cfg.num_heads < 1 or cfg.hidden_size % cfg.num_heads:
        raise BackboneError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                            f"the number of attention heads {cfg.num_heads}")
    return dataclasses.replace(cfg, position_offset=arch.position_offset(cfg))


def parameter_shapes(cfg) -> dict:
    """Our Encoder's (or Decoder's) parameters and their shapes (tests/test_architecture.py holds this to the
    models)."""
    if not isinstance(cfg, EncoderConfig):
        return decoder_shapes(cfg)
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embeddings.word": (cfg.vocab_size, h), "embeddings.position": (cfg.max_positions, h)}
    if cfg.type_vocab_size:
        shapes["embeddings.token_type"] = (cfg.type_vocab_size, h)
    shapes.update({"embeddings.norm.gamma": (h,), "embeddings.norm.beta": (h,)})
    layer = {
        "attention.qkv.weight": (3 * h, h), "attention.qkv.bias": (3 * h,),
        "attention.out.weight": (h, h), "attention.out.bias": (h,),
        "attention.norm.gamma": (h,), "attention.norm.beta": (h,),
        "ffn.up.weight": (f, h), "ffn.up.bias": (f,),
        "ffn.down.weight": (h, f), "ffn.down.bias": (h,),
        "ffn.norm.gamma": (h,), "ffn.norm.beta": (h,),
    }
    for i in range(cfg.num_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def decoder_shapes(cfg) -> dict:
    h, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.kv_width
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    for i in range(cfg.num_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


@dataclass(frozen=True)
class Weight:
    """One parameter of ours: its shape, and the checkpoint tensors (concatenated along axis 0) it is made of."""

    name: str
    shape: tuple
    sources: tuple

    @property
    def source_shape(self) -> tuple:
        """The shape each source tensor must have."""
        return (self.shape[0] // len(self.sources),) + tuple(self.shape[1:])

    def take(self, tensors: dict):
        import numpy as np

        parts = [tensors[s] for s in self.sources]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, 0)


def weight_map(arch: Architecture, cfg: EncoderConfig) -> dict:
    """Our parameter name -> Weight, for every parameter of the Encoder `cfg` describes."""
    out = {}
    for name, shape in parameter_shapes(cfg).items():
        template = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
        if template not in arch.weights:
            raise BackboneError(f"architecture {arch.model_type!r} maps no checkpoint tensor to {template}")
        layer = name.split(".")[1] if template != name else ""
        spec = arch.weights[template]
        sources = (spec,) if isinstance(spec, str) else tuple(spec)
        out[name] = Weight(name, shape, tuple(s.format(i=layer) for s in sources))
    return out


from . import bert, llama, roberta  # noqa: E402  (they build on Architecture, above)

register(bert.BERT)
register(roberta.ROBERTA)
register(llama.LLAMA)
