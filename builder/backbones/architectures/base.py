"""What an architecture is: `Architecture`, the declarative map from one checkpoint family onto our models,
and `Weight`, one of our parameters and the checkpoint tensors it is made of."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..configs import EncoderConfig
from ...errors import BackboneError

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
    family: str = "encoder"  # builder.families' key: "encoder" (builder.models.encoder) or "decoder"
    read_config: Callable = None  # (arch, parsed config.json, source) -> config; None: encoder_config
    embeddings: str = "embeddings.word"  # our name of the token embedding table


def config_from(arch: Architecture, raw: dict, source):
    """The config (EncoderConfig, DecoderConfig) of a parsed config.json, as the architecture reads it; a missing
    or malformed field is a BackboneError."""
    return (arch.read_config or encoder_config)(arch, raw, source)


def encoder_config(arch: Architecture, raw: dict, source) -> EncoderConfig:
    """A BERT-like EncoderConfig, config.json's keys named by `arch.config`."""
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
        parts = [tensors[s] for s in self.sources]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, 0)


def weight_map(arch: Architecture, cfg) -> dict:
    """Our parameter name -> Weight, for every parameter of the model `cfg` describes."""
    out = {}
    for name, shape in cfg.parameter_shapes().items():
        template = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
        if template not in arch.weights:
            raise BackboneError(f"architecture {arch.model_type!r} maps no checkpoint tensor to {template}")
        layer = name.split(".")[1] if template != name else ""
        spec = arch.weights[template]
        sources = (spec,) if isinstance(spec, str) else tuple(spec)
        out[name] = Weight(name, shape, tuple(s.format(i=layer) for s in sources))
    return out
