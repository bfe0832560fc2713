"""The ONNX graph of a Llama-family decoder with a KV cache, written op by op from its weights.

One graph serves both phases of generation: prefill (the prompt's tokens,
after the bundle's prompt cache) and decode (one token after everything so
far).  Its signature is runtime.format.decoder_signature:

    input_ids       int64   [batch, seq]
    position_ids    int64   [batch, seq]             the text starts at P, the prompt cache's length
    attention_mask  int64   [batch, past + seq]      1 = attend; covers the cache positions too
    past_key.{i}    float32 [batch, kv_heads, past, head_dim]   per layer i (past_value.{i} the same)
 -> logits          float32 [batch, vocab]           at each row's last attended new position only
    present_key.{i} float32 [batch, kv_heads, past + seq, head_dim]   (present_value.{i} the same)

"Last attended new position": the last column of the new tokens whose
mask is 1, so a right-padded prefill batch gets each row's next-token
logits; the LM head over the other positions would cost vocab x hidden
multiply-adds per token for nothing (on SmolLM2 as much as 9 layers).

Kernels, chosen on `.venv/bin/python bench/perf/decoder_kernels.py` (SmolLM2-135M-sized random
weights, 20 interleaved calls per candidate on a 2-vCPU AMD EPYC with AVX-512 shared with other
work; median (min) ms, onnxruntime 1.32):

    norm        rotary   attention   prefill 1x64     decode 1 after 100
    ops         ops      matmul      179 (78)         37.4 (14.3)
    simplified  ops      matmul      170 (79)         39.6 (15.1)
    ops         rope23   matmul      172 (74)         40.1 (15.3)
    ops         ops      attn23      165 (87)         30.4 (12.6)
    ops         ops      gqa         177 (85)         37.9 (12.6)
    rms23       rope23   attn23      141 (77)         32.4 (14.8)   <- chosen

The kernels around the GEMMs barely matter (the spread between runs is
larger than between candidates; the GEMMs over 135M weights are the time):
the choice is the standard opset-23 ops, RMSNormalization, RotaryEmbedding
and Attention with past, which were as fast or faster in every column, need
no contrib ops, and make the fewest nodes.  com.microsoft.GroupQueryAttention
was no faster and cannot take this signature's mask (a cached prefill must
be one row).  The rest of the graph:

    MLP         one MatMul for gate and up, Split, x * Sigmoid(x) * up, MatMul
    LM head     Gemm with transB over the embedding table: tied weights stored once

The candidates stay selectable (`Kernels`) so the benchmark can measure
them and a later onnxruntime can be re-measured with one command.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mindspore  # noqa: F401  (before onnx: see builder.models.onnx_ops)
import onnx
from onnx import TensorProto

from ptbundle.runtime.format import (DECODER_INPUTS, DECODER_OUTPUT, past_names, present_names)

from ..backbones.configs import DecoderConfig
from ..models.decoder import rotary_tables
from ..models.onnx_ops import CONTRIB, DECODER_MASK_FILL as MASK_FILL, DECODER_OPSET, Graph, f32, model_proto

LM_HEAD_NODE = "lm_head"  # the head's Gemm node: int8 export may keep it fp32


@dataclass(frozen=True)
class Kernels:
    norm: str = "simplified"  # "ops" | "simplified" | "rms23"
    rotary: str = "ops"  # "ops" | "rope23" | "contrib"
    attention: str = "matmul"  # "matmul" | "attn23" | "gqa" (measured only: see grouped_query_attention)


KERNELS = Kernels("rms23", "rope23", "attn23")  # the module docstring's figures


def llama_weights(weights: dict) -> dict:
    """transformers' LlamaForCausalLM names ("model.layers.0...") or the decoder's own (without "model."):
    the decoder's names, float32."""
    return {k.removeprefix("model."): f32(v) for k, v in weights.items()}


def decoder_graph(weights: dict, cfg: DecoderConfig, kernels: Kernels = KERNELS) -> onnx.ModelProto:
    """The decoder with a KV cache as an onnx.ModelProto (signature in the module docstring)."""
    w = llama_weights(weights)
    g = Graph()
    ids, positions, mask = DECODER_INPUTS
    i64 = lambda name, v: g.const(name, np.asarray(v, np.int64))  # noqa: E731

    shape = g.op("Shape", [ids])
    batch = g.op("Gather", [shape, i64("zero", [0])], axis=0)
    seq = g.op("Gather", [shape, i64("one", [1])], axis=0)
    total = g.op("Gather", [g.op("Shape", [mask]), i64("one", [1])], axis=0)
    past = g.op("Sub", [total, seq])

    # One additive bias for every layer: key k is visible to new token j (absolute index past + j) when
    # k <= past + j (causal) and the mask lets it (padding).  [batch, 1, seq, past + seq]
    scalar = lambda t: g.op("Squeeze", [t, i64("axis0", [0])])  # noqa: E731
    key_index = g.op("Range", [i64("zero_scalar", 0), scalar(total), i64("one_scalar", 1)])
    query_index = g.op("Range", [scalar(past), scalar(total), i64("one_scalar", 1)])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [key_index, i64("axis0", [0])]),
                                  g.op("Unsqueeze", [query_index, i64("axis1", [1])])])  # [seq, total]
    padding = g.op("Cast", [g.op("Unsqueeze", [mask, i64("axes12", [1, 2])])], to=TensorProto.BOOL)
    visible = g.op("And", [causal, padding])  # [b, 1, seq, total]
    bias = g.op("Where", [visible, g.const("zero_f", 0.0, np.float32), g.const("mask_fill", MASK_FILL, np.float32)])

    # Rotary tables for every position the model knows, gathered by position id.
    cos_half, sin_half = rotary_tables(cfg)
    rope = Rope(g, kernels.rotary, cos_half, sin_half, positions)

    embed = g.const("embed_tokens.weight", w["embed_tokens.weight"])
    x = g.op("Gather", [embed, ids], axis=0)  # [b, s, h]
    for i in range(cfg.num_layers):
        x = decoder_layer(g, w, i, x, cfg, kernels, rope, bias, batch, seq)

    # The last attended new position of each row: max over j of j * mask[past + j].
    new_mask = g.op("Slice", [mask, past, total, i64("axis1", [1])])
    seq_range = g.op("Range", [i64("zero_scalar", 0), scalar(seq), i64("one_scalar", 1)])
    last = g.op("ReduceMax", [g.op("Mul", [new_mask, seq_range]), i64("axis1", [1])], keepdims=1)  # [b, 1]
    x = g.op("GatherND", [x, last], batch_dims=1)  # [b, h]
    x = rms_norm(g, x, g.const("norm.weight", w["norm.weight"]), cfg.rms_norm_eps, kernels.norm)
    head = embed if cfg.tie_embeddings else g.const("lm_head.weight", w["lm_head.weight"])
    g.op("Gemm", [x, head], transB=1, name=LM_HEAD_NODE, output=DECODER_OUTPUT)
    return decoder_proto(g, cfg)


class Rope:
    """Rotary position embedding of [b, heads, s, d] query/key states (rotate_half, not interleaved)."""

    def __init__(self, g: Graph, kind: str, cos_half, sin_half, positions: str):
        self.g, self.kind, self.positions = g, kind, positions
        if kind == "ops":
            # Full-width tables ([cos, cos]) gathered once per call of the graph, shared by every layer.
            axis1 = g.const("axis1", np.asarray([1], np.int64))
            full = lambda t, name: g.op("Unsqueeze", [g.op("Gather", [g.const(name, np.concatenate([t, t], 1)),  # noqa: E731
                                                                      positions], axis=0), axis1])
            self.cos, self.sin = full(cos_half, "rope_cos"), full(sin_half, "rope_sin")  # [b, 1, s, d]
        else:
            self.cos, self.sin = g.const("rope_cos_half", cos_half), g.const("rope_sin_half", sin_half)

    def __call__(self, x: str, heads: int, d: int) -> str:
        g = self.g
        if self.kind == "rope23":
            return g.op("RotaryEmbedding", [x, self.cos, self.sin, self.positions], interleaved=0)
        if self.kind == "contrib":
            return g.op("RotaryEmbedding", [x, self.positions, self.cos, self.sin], domain=CONTRIB, interleaved=0,
                        num_heads=heads)
        first, second = g.op("Split", [x, g.const("rope_halves", np.asarray([d // 2, d // 2], np.int64))], axis=-1,
                             outputs=2)
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
        return g.op("Add", [g.op("Mul", [x, self.cos]), g.op("Mul", [rotated, self.sin])])


def rms_norm(g: Graph, x: str, weight: str, eps: float, kind: str) -> str:
    if kind == "simplified":  # onnxruntime's kernel, registered in the default domain
        return g.op("SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=eps)
    if kind == "rms23":
        return g.op("RMSNormalization", [x, weight], axis=-1, epsilon=eps)
    mean_square = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const("last_axis", np.asarray([-1], np.int64))],
                       keepdims=1)
    scale = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean_square, g.const("rms_eps", eps, np.float32)])])])
    return g.op("Mul", [g.op("Mul", [x, scale]), weight])


def decoder_layer(g: Graph, w: dict, i: int, x: str, cfg: DecoderConfig, kernels: Kernels, rope: Rope, bias: str,
                  batch: str, seq: str) -> str:
    at, mlp = f"layers.{i}.self_attn", f"layers.{i}.mlp"
    d, heads, kv_heads = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q_width, kv_width = heads * d, kv_heads * d
    i64 = lambda name, v: g.const(name, np.asarray(v, np.int64))  # noqa: E731
    h = rms_norm(g, x, g.const(f"layers.{i}.input_layernorm.weight", w[f"layers.{i}.input_layernorm.weight"]),
                 cfg.rms_norm_eps, kernels.norm)
    # One GEMM for q, k and v: at one decode token each of the three is a small matrix-vector product, and
    # every kernel call costs about as much as a small one does.
    qkv_weight = np.concatenate([w[f"{at}.{p}_proj.weight"] for p in "qkv"], 0).T
    qkv = g.op("MatMul", [h, g.const(f"{at}.qkv.weight", qkv_weight)], name=f"{at}.qkv")
    if cfg.qkv_bias:  # Qwen2; a separate Add keeps the MatMul for the block quantizer
        qkv = g.op("Add", [qkv, g.const(f"{at}.qkv.bias", np.concatenate([w[f"{at}.{p}_proj.bias"] for p in "qkv"]))])
    q, k, v = g.op("Split", [qkv, i64("qkv_split", [q_width, kv_width, kv_width])], axis=-1, outputs=3)

    def heads_first(t, n):  # [b, s, n * d] -> [b, n, s, d]
        return g.op("Transpose", [g.op("Reshape", [t, i64(f"heads_{n}", [0, 0, n, d])])], perm=[0, 2, 1, 3])

    q, k, v = heads_first(q, heads), heads_first(k, kv_heads), heads_first(v, kv_heads)
    q, k = rope(q, heads, d), rope(k, kv_heads, d)
    past_key, past_value = past_names(i)
    present_key, present_value = present_names(i)
    if kernels.attention == "attn23":
        ctx = g.op("Attention", [q, k, v, bias, past_key, past_value], outputs=3, scale=float(d ** -0.5),
                   output=f"attn23_{i}")
        # onnxruntime names the extra outputs after the first; give them the graph's output names
        g.nodes[-1].output[1], g.nodes[-1].output[2] = present_key, present_value
        ctx = ctx[0]  # [b, heads, s, d]
    elif kernels.attention == "gqa":
        ctx = grouped_query_attention(g, q, k, v, bias, i, cfg)
    else:
        keys = g.op("Concat", [past_key, k], axis=2, output=present_key)
        values = g.op("Concat", [past_value, v], axis=2, output=present_value)
        ctx = grouped_attention(g, q, keys, values, bias, heads, kv_heads, d)
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), i64("merge_heads", [0, 0, q_width])])
    x = g.op("Add", [x, g.op("MatMul", [ctx, g.const(f"{at}.o_proj.weight", w[f"{at}.o_proj.weight"].T)],
                             name=f"{at}.o_proj")])

    h = rms_norm(g, x, g.const(f"layers.{i}.post_attention_layernorm.weight",
                               w[f"layers.{i}.post_attention_layernorm.weight"]), cfg.rms_norm_eps, kernels.norm)
    gate_up = np.concatenate([w[f"{mlp}.gate_proj.weight"], w[f"{mlp}.up_proj.weight"]], 0).T
    gate, up = g.op("Split", [g.op("MatMul", [h, g.const(f"{mlp}.gate_up.weight", gate_up)], name=f"{mlp}.gate_up")],
                    axis=-1, num_outputs=2, outputs=2)
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    return g.op("Add", [x, g.op("MatMul", [act, g.const(f"{mlp}.down_proj.weight", w[f"{mlp}.down_proj.weight"].T)],
                                name=f"{mlp}.down_proj")])


def grouped_attention(g: Graph, q: str, keys: str, values: str, bias: str, heads: int, kv_heads: int, d: int) -> str:
    """softmax(q k^T / sqrt(d) + bias) v with `heads` query heads over `kv_heads` key/value heads, without
    copying the keys: the group's query heads ride along a broadcast axis ([b, kv, group, s, d])."""
    group = heads // kv_heads
    i64 = lambda name, v: g.const(name, np.asarray(v, np.int64))  # noqa: E731
    q = g.op("Reshape", [q, i64(f"grouped_{kv_heads}_{group}", [0, kv_heads, group, -1, d])])
    unsqueeze2 = i64("axis2", [2])
    keys_t = g.op("Unsqueeze", [g.op("Transpose", [keys], perm=[0, 1, 3, 2]), unsqueeze2])  # [b, kv, 1, d, t]
    scores = g.op("MatMul", [q, keys_t])  # [b, kv, group, s, t]
    scores = g.op("Add", [g.op("Mul", [scores, g.const("attn_scale", d ** -0.5, np.float32)]),
                          g.op("Unsqueeze", [bias, unsqueeze2])])
    probs = g.op("Softmax", [scores], axis=-1)
    ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [values, unsqueeze2])])  # [b, kv, group, s, d]
    return g.op("Reshape", [ctx, i64(f"ungrouped_{heads}", [0, heads, -1, d])])


def grouped_query_attention(g: Graph, q: str, k: str, v: str, bias: str, i: int, cfg: DecoderConfig) -> str:
    """onnxruntime's com.microsoft.GroupQueryAttention, for the benchmark only: it takes each row's length
    instead of a mask and writes a row's new keys after its own length, so it equals this graph's
    signature only for rows without padding (one prompt at a time)."""
    d, heads, kv_heads = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    i64 = lambda name, val: g.const(name, np.asarray(val, np.int64))  # noqa: E731
    mask = DECODER_INPUTS[2]
    flat = lambda t: g.op("Reshape", [g.op("Transpose", [t], perm=[0, 2, 1, 3]), i64("flat_heads", [0, 0, -1])])  # noqa: E731
    lengths = g.op("Cast", [g.op("Sub", [g.op("ReduceSum", [mask, i64("axis1", [1])], keepdims=0),
                                         i64("one_scalar", 1)])], to=TensorProto.INT32)
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", [mask]), i64("one_scalar", 1)], axis=0)], to=TensorProto.INT32)
    past_key, past_value = past_names(i)
    ctx, key, value = g.op("GroupQueryAttention", [flat(q), flat(k), flat(v), past_key, past_value, lengths, total],
                           domain=CONTRIB, num_heads=heads, kv_num_heads=kv_heads, scale=float(d ** -0.5),
                           outputs=3, output=f"gqa_{i}")
    g.nodes[-1].output[1], g.nodes[-1].output[2] = present_names(i)
    return g.op("Transpose", [g.op("Reshape", [ctx, i64(f"heads_{heads}", [0, 0, heads, d])])], perm=[0, 2, 1, 3])


def decoder_proto(g: Graph, cfg: DecoderConfig) -> onnx.ModelProto:
    ids, positions, mask = DECODER_INPUTS
    cache = lambda name, length: (name, TensorProto.FLOAT, ["batch", cfg.num_kv_heads, length, cfg.head_dim])  # noqa: E731
    inputs = [(ids, TensorProto.INT64, ["batch", "seq"]), (positions, TensorProto.INT64, ["batch", "seq"]),
              (mask, TensorProto.INT64, ["batch", "total"])]
    outputs = [(DECODER_OUTPUT, TensorProto.FLOAT, ["batch", cfg.vocab_size])]
    for i in range(cfg.num_layers):
        inputs += [cache(n, "past") for n in past_names(i)]
        outputs += [cache(n, "total") for n in present_names(i)]
    return model_proto(g, "ptbundle_decoder", inputs, outputs, DECODER_OPSET)
