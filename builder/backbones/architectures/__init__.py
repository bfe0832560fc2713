"""Checkpoint architectures as small declarative adapters, keyed by config.json's `model_type`.

An `Architecture` says how one family's Hugging Face checkpoint maps onto
one of two MindSpore models, its `family`: the `Encoder` (builder.models.encoder,
BERT-like) or the `Decoder` (builder.models.decoder, Llama-like).  For an encoder: which config.json keys give
the `EncoderConfig`, where positions start, whether it takes token types,
its padding side and special tokens, and, for each of the Encoder's
parameters, the checkpoint tensor(s) it is made of.  `weight_map` turns an
architecture and a config into the full list of `Weight`s; the shape check
and the loading (builder.backbones.backbone) and the ONNX writers (builder.graphs)
all read it, so every name is written once, in the architecture's file.

Adding an architecture: a file beside bert.py that builds an `Architecture`,
and one `register(...)` line at the end of this one (or `register` from
anywhere, e.g. a test, before the backbone is loaded).
"""

from __future__ import annotations

from . import bert, llama, qwen2, roberta
from .base import Architecture, Weight, config_from, weight_map  # noqa: F401  (the package's API)
from ...errors import BackboneError

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


register(bert.BERT)
register(roberta.ROBERTA)
register(llama.LLAMA)
register(qwen2.QWEN2)
