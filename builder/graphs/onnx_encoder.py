"""The ONNX graph of a folded classifier, written op by op from its weights.

MindSpore's ONNX exporter writes static shapes only and no fused operators:
every LayerNorm comes out as nine elementwise ops, GELU as a polynomial, and
attention as a chain of reshapes and transposes that onnxruntime's fusion
passes do not recognise.  So this module writes the graph itself, with the
kernels onnxruntime runs a BERT fastest with on CPU (measured, bench/perf/fusion.py):

    embeddings     Gather + Add, LayerNormalization
    attention      com.microsoft.Attention   (QKV GEMM, scaled scores, mask, softmax, context)
                   MatMul + Add, Add (residual), LayerNormalization
    feed-forward   MatMul + Add, Gelu (exact erf), MatMul + Add, Add, LayerNormalization
    head           mean or cls pooling, optional unit normalisation, MatMul + Add

Residual + LayerNorm and bias + GELU stay separate ops: onnxruntime's fused
SkipLayerNormalization and BiasGelu are slower here (runtime.onnx_backend
turns off the passes that would fuse them).

Batch and sequence axes are symbolic; the prompt is a constant broadcast in
front of the word embeddings, exactly as `PromptClassifier.features` does it.
The export checks this graph against the MindSpore net (builder.graphs.targets.check_parity),
so a mistake here fails the build instead of shipping.
"""


from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ptbundle.runtime.format import INPUT_NAMES, OUTPUT_NAME, TASK_INPUT

from ..models.classifier import MultiTaskClassifier, PromptClassifier, pooling_kinds, table_shape
from ..models.onnx_ops import CONTRIB, MASK_FILL, Graph, f32, layer_norm, linear, model_proto
from ..models.pooling import POOLING
from ..models.prompts import PROMPTS, PromptSpec, prefix_rows

HEAD_NODES = ("pooler", "classifier")  # names of the head's MatMul nodes (int8 export keeps them fp32)


def weights_of(net) -> dict:
    """The arrays the graph needs, read off a PromptClassifier, under the Encoder's parameter names
    (those the architectures' weight maps fill) and head_params' names, the prompt folded (builder.models.prompts):
    they are also the graph's initializer names."""
    encoder = {k: v.asnumpy() for k, v in net.encoder.parameters_and_names()}
    return {k: f32(v) for k, v in {**encoder, **net.folded_state()}.items()}


def build_graph(weights: dict, config, spec: PromptSpec, pooling: str, normalize: bool) -> onnx.ModelProto:
    """The classifier as an onnx.ModelProto: int32 [batch, seq] x3 in, float32 [batch, labels] out."""
    g = Graph()
    method = PROMPTS[spec.method]  # builder.models.prompts: its onnx_* hooks mirror the Cell's
    ids, mask, types = INPUT_NAMES
    batch, seq = batch_and_seq(g)
    token_types = "embeddings.token_type" in weights  # an architecture may have none: the input is then unused
    embeds = g.op("Gather", [g.const("embeddings.word", weights["embeddings.word"]), ids], axis=0)  # [b, s, h]
    embeds, full_mask, types = method.onnx_embed(g, weights, spec, embeds, mask, types if token_types else None, batch)
    length, shift, top = method.layout(spec)  # states in front at the embeddings; position shift; at the top
    # Position rows start .. start + length + seq (RoBERTa's start after the pad id; a prefix's shift later).
    start = config.position_offset + shift
    end = g.op("Add", [seq, g.const("position_end_offset", [start + length], np.int64)])
    positions = g.op("Slice", [g.const("embeddings.position", weights["embeddings.position"]),
                               g.const("position_start", [start], np.int64), end, g.const("axis0", [0], np.int64)])
    x = encoder_body(g, weights, config, g.op("Add", [embeds, positions]), types, full_mask, spec, batch)
    pooled = POOLING[pooling].onnx(g, weights, x, mask, top)  # builder.models.pooling
    linear(g, weights, "classifier", unit_length(g, pooled) if normalize else pooled, output=OUTPUT_NAME)
    return classifier_proto(g, list(INPUT_NAMES), weights["classifier.bias"].shape[0])


def build_multitask_graph(weights: dict, config, tasks: list) -> onnx.ModelProto:
    """model.MultiTaskClassifier as ONNX: also int32 task_ids [batch] in, float32 [batch, widest labels] out.

    `weights`: the encoder's, plus the task tables (builder.models.classifier.task_tables, which explains the
    layout); every per-task array is gathered by the rows' task ids, so no op's cost grows with the task count.
    """
    g = Graph()
    ids, mask, types = INPUT_NAMES
    batch, seq = batch_and_seq(g)
    token_types = "embeddings.token_type" in weights
    table = lambda name: g.op("Gather", [g.table_input(name, weights[name], 0), TASK_INPUT], axis=0)  # noqa: E731
    layers = config.num_layers
    slots, q, width, past_from = table_shape(config, tasks)
    x = g.op("Gather", [g.const("embeddings.word", weights["embeddings.word"]), ids], axis=0)
    full_types = types if token_types else None
    if slots:
        x = g.op("Concat", [table("task.slot_embeds"), x], axis=1)
        if token_types:
            zeros = g.op("Expand", [g.const("prefix_zeros", [[0]], np.int32),
                                    g.op("Concat", [batch, g.const("prompt_len", [slots], np.int64)], axis=0)])
            full_types = g.op("Concat", [zeros, types], axis=1)
    # Slot m of a row is position m + text_start, clamped to [0, room - 1] (MultiTaskClassifier.construct).
    room = config.max_positions - config.position_offset
    index = g.op("Slice", [g.const("slot_index", np.arange(slots + room, dtype=np.int64)),
                           g.const("zero_start", [0], np.int64), g.op("Add", [seq, g.const("slot_count", [slots], np.int64)]),
                           g.const("axis0", [0], np.int64)])
    start = g.op("Unsqueeze", [g.op("Cast", [table("task.text_start")], to=TensorProto.INT64),
                               g.const("axis1", [1], np.int64)])
    positions = g.op("Min", [g.op("Max", [g.op("Add", [g.op("Unsqueeze", [index, g.const("axis0", [0], np.int64)]),
                                                        start]), g.const("position_floor", 0, np.int64)]),
                             g.const("position_ceiling", room - 1, np.int64)])
    positions = g.op("Add", [positions, g.const("position_offset", config.position_offset, np.int64)])
    x = g.op("Add", [x, g.op("Gather", [g.const("embeddings.position", weights["embeddings.position"]), positions],
                             axis=0)])
    if full_types is not None:
        x = g.op("Add", [x, g.op("Gather", [g.const("embeddings.token_type", weights["embeddings.token_type"]),
                                            full_types], axis=0)])
    x = layer_norm(g, weights, x, "embeddings.norm", config.layer_norm_eps)
    visible = table("task.visible")  # [b, layers, Q + S]
    entering = np.flatnonzero(weights["task.enters"].any(0))
    if len(entering):
        enters = g.op("Cast", [table("task.enters")], to=TensorProto.BOOL)
        late = table("task.late")
    for i in range(layers):
        if i in entering:  # an entered prompt replaces its rows' slot states here
            now = g.op("Unsqueeze", [g.op("Gather", [enters, g.const(f"layer_{i}", i, np.int64)], axis=1),
                                     g.const("axes12", [1, 2], np.int64)])
            head = g.op("Slice", [x, g.const("zero_start", [0], np.int64), g.const("slot_end", [slots], np.int64),
                                  g.const("axis1", [1], np.int64)])
            rest = g.op("Slice", [x, g.const("slot_end", [slots], np.int64),
                                  g.const("text_end", [np.iinfo(np.int64).max], np.int64), g.const("axis1", [1], np.int64)])
            x = g.op("Concat", [g.op("Where", [now, late, head]), rest], axis=1)
        seen = g.op("Gather", [visible, g.const(f"layer_{i}", i, np.int64)], axis=1)  # [b, Q + S]
        past = None
        if i >= past_from:
            past = g.op("Gather", [g.table_input(f"task.past.{i}", weights[f"task.past.{i}"], 1), TASK_INPUT], axis=1)
        elif q:
            seen = g.op("Slice", [seen, g.const("past_len", [q], np.int64),
                                  g.const("text_end", [np.iinfo(np.int64).max], np.int64), g.const("axis1", [1], np.int64)])
        layer_mask = g.op("Concat", [seen, mask], axis=1) if q + slots else mask
        x = encoder_layer(g, weights, i, x, layer_mask, config.num_heads, config.layer_norm_eps, past)
    kinds = pooling_kinds(tasks)
    first = g.op("Cast", [g.op("Equal", [g.op("Unsqueeze", [g.const("first_index", np.arange(slots + 1, dtype=np.int32)),
                                                             g.const("axis0", [0], np.int64)]),
                                         g.op("Unsqueeze", [table("task.first"), g.const("axis1", [1], np.int64)])])],
                 to=TensorProto.FLOAT)  # [b, S + 1]: the state a first-token pooling reads
    kind = g.op("Unsqueeze", [table("task.pooling"), g.const("axis1", [1], np.int64)])
    pooled = None
    for k, name in enumerate(kinds):
        pooling = POOLING[name]
        rows = pooling.onnx_rows(g, x, mask, first, tuple(table(f"task.{p}") for p in pooling.table_params))
        pooled = rows if pooled is None else g.op(
            "Where", [g.op("Equal", [kind, g.const(f"pooling_{k}", [[k]], np.int32)]), rows, pooled])
    normalize = g.op("Cast", [g.op("Unsqueeze", [table("task.normalize"), g.const("axis1", [1], np.int64)])],
                     to=TensorProto.BOOL)
    pooled = g.op("Where", [normalize, unit_length(g, pooled), pooled])
    logits = g.op("MatMul", [g.op("Unsqueeze", [pooled, g.const("axis1", [1], np.int64)]),
                             table("task.classifier.weight")], name="classifier")
    g.op("Add", [g.op("Squeeze", [logits, g.const("axis1", [1], np.int64)]), table("task.classifier.bias")],
         output=OUTPUT_NAME)
    return classifier_proto(g, list(INPUT_NAMES) + [TASK_INPUT], width)


def batch_and_seq(g: Graph) -> tuple:
    """The batch and sequence sizes of input_ids, as [1] int64 tensors."""
    shape = g.op("Shape", [INPUT_NAMES[0]])
    return (g.op("Gather", [shape, g.const("zero", [0], np.int64)], axis=0),
            g.op("Gather", [shape, g.const("one", [1], np.int64)], axis=0))


def encoder_body(g: Graph, weights: dict, config, x: str, types: str | None, mask: str,
                 spec: PromptSpec = PromptSpec(), batch: str | None = None) -> str:
    """Token types, the embedding LayerNorm and every layer, over embeddings that have their positions;
    the prompt's layer hooks (builder.models.prompts) on the way."""
    method = PROMPTS[spec.method]
    if types is not None:
        x = g.op("Add", [x, g.op("Gather", [g.const("embeddings.token_type", weights["embeddings.token_type"]), types],
                                 axis=0)])
    x = layer_norm(g, weights, x, "embeddings.norm", config.layer_norm_eps)
    keys_mask = None
    for i in range(config.num_layers):
        x, mask = method.onnx_enter(g, weights, spec, i, x, mask, batch)
        past = method.onnx_past(g, weights, spec, config, i, batch)
        if past is not None and keys_mask is None:  # a prefix: its P keys are always visible
            keys_mask = g.op("Concat", [prefix_rows(g, batch, spec.virtual_tokens, 1, "prefix_ones"), mask], axis=1)
        x = encoder_layer(g, weights, i, x, mask if past is None else keys_mask, config.num_heads,
                          config.layer_norm_eps, past)
    return x


def unit_length(g: Graph, x: str) -> str:
    norm = g.op("ReduceL2", [x, g.const("last_axis", [-1], np.int64)], keepdims=1)
    return g.op("Div", [x, g.op("Max", [norm, g.const("norm_floor", 1e-12, np.float32)])])


def classifier_proto(g: Graph, inputs: list, width: int) -> onnx.ModelProto:
    """int32 [batch, seq] inputs (task_ids [batch]) in, float32 logits [batch, width] out."""
    axes = lambda name: ["batch"] if name == TASK_INPUT else ["batch", "seq"]  # noqa: E731
    return model_proto(g, "ptbundle_classifier", [(n, TensorProto.INT32, axes(n)) for n in inputs],
                       [(OUTPUT_NAME, TensorProto.FLOAT, ["batch", width])])


def encoder_layer(g: Graph, w: dict, i: int, x: str, mask: str, heads: int, eps: float, past: str | None = None) -> str:
    """One transformer layer (post-LayerNorm, as BERT) over x [b, s, h]; weights under model.Layer's names.
    `past`: constant keys and values [2, b, heads, P, head_dim] in front of the layer's own (a prefix); `mask`
    then covers P + s keys."""
    at, ffn = f"layers.{i}.attention", f"layers.{i}.ffn"
    qkv_weight = g.const(f"{at}.qkv.weight", w[f"{at}.qkv.weight"].T)  # [in, 3 * hidden], as Attention wants
    inputs = [x, qkv_weight, g.const(f"{at}.qkv.bias", w[f"{at}.qkv.bias"]), mask] + ([past] if past else [])
    # With a past, onnxruntime's Attention insists on writing `present` (past + own keys), unused here.
    ctx = g.op("Attention", inputs, domain=CONTRIB, num_heads=heads, mask_filter_value=MASK_FILL,
               outputs=2 if past else 1, name=at)  # named: int8 calibration ranges are kept by node (quantize)
    ctx = ctx[0] if past else ctx
    x = layer_norm(g, w, g.op("Add", [linear(g, w, f"{at}.out", ctx), x]), f"{at}.norm", eps)
    up = g.op("Gelu", [linear(g, w, f"{ffn}.up", x)])
    return layer_norm(g, w, g.op("Add", [linear(g, w, f"{ffn}.down", up), x]), f"{ffn}.norm", eps)



def export_classifier(net: PromptClassifier, path) -> Path:
    """A PromptClassifier as ONNX with symbolic batch and sequence axes."""
    return save(build_graph(weights_of(net), net.encoder.config, net.spec.folded(), net.pooling, net.normalize), path)


def export_multitask(net: MultiTaskClassifier, path) -> Path:
    """A MultiTaskClassifier as ONNX: also task_ids [batch] in."""
    return save(build_multitask_graph(multitask_weights(net), net.encoder.config, list(net.specs)), path)


def save(model: onnx.ModelProto, path) -> Path:
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def multitask_weights(net) -> dict:
    """A MultiTaskClassifier's arrays under the names build_multitask_graph reads: the encoder's and its tables."""
    return {**{k: f32(v.asnumpy()) for k, v in net.encoder.parameters_and_names()}, **net.tables}
