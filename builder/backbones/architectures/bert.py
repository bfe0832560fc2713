"""BERT (and MiniLM, its distillation): the reference layout the others are written against."""

from .base import Architecture

LAYER = "encoder.layer.{i}."
QKV = tuple(LAYER + f"attention.self.{p}" for p in ("query", "key", "value"))

# Our parameter -> checkpoint tensor(s); a tuple is concatenated along axis 0.
WEIGHTS = {
    "embeddings.word": "embeddings.word_embeddings.weight",
    "embeddings.position": "embeddings.position_embeddings.weight",
    "embeddings.token_type": "embeddings.token_type_embeddings.weight",
    "embeddings.norm.gamma": "embeddings.LayerNorm.weight",
    "embeddings.norm.beta": "embeddings.LayerNorm.bias",
    "layers.{i}.attention.qkv.weight": tuple(p + ".weight" for p in QKV),
    "layers.{i}.attention.qkv.bias": tuple(p + ".bias" for p in QKV),
    "layers.{i}.attention.out.weight": LAYER + "attention.output.dense.weight",
    "layers.{i}.attention.out.bias": LAYER + "attention.output.dense.bias",
    "layers.{i}.attention.norm.gamma": LAYER + "attention.output.LayerNorm.weight",
    "layers.{i}.attention.norm.beta": LAYER + "attention.output.LayerNorm.bias",
    "layers.{i}.ffn.up.weight": LAYER + "intermediate.dense.weight",
    "layers.{i}.ffn.up.bias": LAYER + "intermediate.dense.bias",
    "layers.{i}.ffn.down.weight": LAYER + "output.dense.weight",
    "layers.{i}.ffn.down.bias": LAYER + "output.dense.bias",
    "layers.{i}.ffn.norm.gamma": LAYER + "output.LayerNorm.weight",
    "layers.{i}.ffn.norm.beta": LAYER + "output.LayerNorm.bias",
}
POOLER = ("pooler.dense.weight", "pooler.dense.bias")

BERT = Architecture(
    model_type="bert",
    prefix="bert.",
    weights=WEIGHTS,
    special_tokens={"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]"},
    pooler=POOLER,
)
