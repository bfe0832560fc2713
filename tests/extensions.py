"""Kinds that exist only in the tests, declared as a user would declare their own: a DistilBERT-like architecture
and a prompt method.  The tests register them, then build, export and serve bundles with them
(tests/builder/backbones/test_architecture.py, tests/builder/test_extension.py); nothing in builder/ or runtime/ names them."""

import json

import numpy as np
from mindspore import Parameter
from safetensors.numpy import save_file

from checkpoints import HEADS, HIDDEN, INTERMEDIATE, LAYERS, MAX_POSITIONS, bert_tokenizer
from ptbundle.builder.backbones.architectures import Architecture
from ptbundle.builder.backbones.architectures.base import HF_CONFIG
from ptbundle.builder.models.prompts import PromptMethod, PromptSpec

LAYER = "transformer.layer.{i}."
DISTILBERT = Architecture(
    model_type="distilbert",
    prefix="distilbert.",
    config={**HF_CONFIG, "hidden_size": "dim", "num_layers": "n_layers", "num_heads": "n_heads",
            "intermediate_size": "hidden_dim", "hidden_act": "activation", "layer_norm_eps": None},
    token_types=False,
    special_tokens={"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]"},
    weights={
        "embeddings.word": "embeddings.word_embeddings.weight",
        "embeddings.position": "embeddings.position_embeddings.weight",
        "embeddings.norm.gamma": "embeddings.LayerNorm.weight",
        "embeddings.norm.beta": "embeddings.LayerNorm.bias",
        "layers.{i}.attention.qkv.weight": tuple(LAYER + f"attention.{p}_lin.weight" for p in "qkv"),
        "layers.{i}.attention.qkv.bias": tuple(LAYER + f"attention.{p}_lin.bias" for p in "qkv"),
        "layers.{i}.attention.out.weight": LAYER + "attention.out_lin.weight",
        "layers.{i}.attention.out.bias": LAYER + "attention.out_lin.bias",
        "layers.{i}.attention.norm.gamma": LAYER + "sa_layer_norm.weight",
        "layers.{i}.attention.norm.beta": LAYER + "sa_layer_norm.bias",
        "layers.{i}.ffn.up.weight": LAYER + "ffn.lin1.weight",
        "layers.{i}.ffn.up.bias": LAYER + "ffn.lin1.bias",
        "layers.{i}.ffn.down.weight": LAYER + "ffn.lin2.weight",
        "layers.{i}.ffn.down.bias": LAYER + "ffn.lin2.bias",
        "layers.{i}.ffn.norm.gamma": LAYER + "output_layer_norm.weight",
        "layers.{i}.ffn.norm.beta": LAYER + "output_layer_norm.bias",
    },
)


def write_distilbert(directory, seed=0):
    """config.json, model.safetensors and tokenizer.json as transformers saves a DistilBertModel."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = bert_tokenizer()
    cfg = {"architectures": ["DistilBertModel"], "model_type": "distilbert", "vocab_size": tok.get_vocab_size(),
           "dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": INTERMEDIATE, "activation": "gelu",
           "max_position_embeddings": MAX_POSITIONS, "pad_token_id": 0, "sinusoidal_pos_embds": False,
           "dropout": 0.1, "attention_dropout": 0.1}
    rng = np.random.RandomState(seed)
    normal = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    h, f = HIDDEN, INTERMEDIATE
    w = {"embeddings.word_embeddings.weight": normal(cfg["vocab_size"], h),
         "embeddings.position_embeddings.weight": normal(MAX_POSITIONS, h),
         "embeddings.LayerNorm.weight": 1 + normal(h), "embeddings.LayerNorm.bias": normal(h)}
    for n in range(LAYERS):
        l = LAYER.format(i=n)
        for proj in ("q_lin", "k_lin", "v_lin", "out_lin"):
            w[l + f"attention.{proj}.weight"], w[l + f"attention.{proj}.bias"] = normal(h, h), normal(h)
        w[l + "ffn.lin1.weight"], w[l + "ffn.lin1.bias"] = normal(f, h), normal(f)
        w[l + "ffn.lin2.weight"], w[l + "ffn.lin2.bias"] = normal(h, f), normal(h)
        for norm in ("sa_layer_norm", "output_layer_norm"):
            w[l + norm + ".weight"], w[l + norm + ".bias"] = 1 + normal(h), normal(h)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({"distilbert." + k: v for k, v in w.items()}, str(directory / "model.safetensors"))
    tok.save(str(directory / "tokenizer.json"))
    return directory


class EmbeddingShift(PromptMethod):
    """A learned vector added to every token's word embedding (before positions): no positions of its own, so the
    text's positions, mask and pooling are untouched.  Its starting value is the mean of the starting tokens'
    embeddings; `virtual_tokens` is how many tokens that mean is over."""

    decoders = False

    def __init__(self, config, spec: PromptSpec):
        super().__init__(config, spec)
        self.shift = Parameter(np.zeros((1, config.hidden_size), np.float32), name="prompt_shift")

    def embed(self, embeds, attention_mask, token_type_ids):
        return embeds + self.shift, attention_mask, token_type_ids

    def params(self) -> dict:
        return {"prompt_shift": self.shift}

    @staticmethod
    def initial(spec: PromptSpec, start) -> dict:
        return {"prompt_shift": start.embeddings().mean(0, keepdims=True)}

    @staticmethod
    def details(spec: PromptSpec) -> dict:
        return {"shift_of": spec.virtual_tokens}

    @staticmethod
    def onnx_embed(g, w: dict, spec: PromptSpec, embeds: str, mask: str, types, batch: str):
        return g.op("Add", [embeds, g.const("prompt_shift", w["prompt_shift"])]), mask, types
