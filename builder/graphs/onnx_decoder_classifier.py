"""The ONNX graph of a DecoderClassifier (builder.models.decoder): the causal LM read at each row's last token by the
label words' rows of its LM head.

The classifier signature of every bundle (int32 input_ids, attention_mask,
token_type_ids [batch, seq] in, float32 logits [batch, labels] out), built
from the generation graph's layer (builder.graphs.onnx_decoder.decoder_layer) so
the two cannot drift apart.  A prompt's keys and values at every layer are
constants here, exactly as a generation bundle's cache starts: a shallow
prompt's are computed once by DecoderClassifier.prompt_cache, a prefix's
are its table.  A prefix from layer k leaves layers 0..k-1 on the text
alone (an empty past, and a mask without the prompt's P keys).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import mindspore  # noqa: F401  (before onnx: see builder.models.onnx_ops)
import onnx
from onnx import TensorProto

from ptbundle.runtime.format import INPUT_NAMES, OUTPUT_NAME, TASK_INPUT, past_names

from .onnx_decoder import KERNELS, MASK_FILL, Rope, decoder_layer, rms_norm
from ..models.decoder import DecoderClassifier, DecoderMultiTask, rotary_tables
from ..models.onnx_ops import DECODER_OPSET, Graph, f32, linear, model_proto

LOWER_OUTPUT = "states"  # lower_graph's output: [batch, seq, hidden]


def classifier_graph(weights: dict, cfg, cache: dict, start: int, first_layer: int, head: dict | None,
                     kernels=KERNELS, layers: int | None = None) -> onnx.ModelProto:
    """`weights`: the decoder's (builder.models.decoder names); `cache`: "key.{i}"/"value.{i}" [kv_heads, P, head_dim]
    for the layers from `first_layer` on (empty: no prompt); `start`: the text's first position; `head`:
    classifier.weight [labels, hidden] and classifier.bias.  With `layers` (and no head): only layers
    0..layers-1, their output states [batch, seq, hidden] out (the part a prefix from that layer never sees)."""
    w = {k: f32(v) for k, v in weights.items()}
    g = Graph()
    ids, mask, _ = INPUT_NAMES
    i64 = lambda name, v: g.const(name, np.asarray(v, np.int64))  # noqa: E731
    p = next(iter(cache.values())).shape[1] if cache else 0

    shape = g.op("Shape", [ids])
    batch = g.op("Gather", [shape, i64("zero", [0])], axis=0)
    seq = g.op("Gather", [shape, i64("one", [1])], axis=0)
    scalar = lambda t: g.op("Squeeze", [t, i64("axis0", [0])])  # noqa: E731
    text_index = g.op("Range", [i64("zero_scalar", 0), scalar(seq), i64("one_scalar", 1)])  # [s]
    positions = g.op("Expand", [g.op("Add", [text_index, i64("text_start", start)]),
                                g.op("Concat", [batch, seq], axis=0)])  # [b, s]: every kernel takes a row each
    rope = Rope(g, kernels.rotary, *rotary_tables(cfg), positions)

    # Bias [b, 1, s, past + s]: the text is causal and padded; a prompt's P keys are visible to every position.
    text_bias, zero, fill = causal_text_bias(g, text_index, mask)
    biases = {0: text_bias}
    if p:
        prompt_rows = g.op("Concat", [batch, i64("prompt_bias_dims", [1]), seq, i64("prompt_len", [p])], axis=0)
        biases[p] = g.op("Concat", [g.op("Expand", [zero, prompt_rows]), text_bias], axis=-1)

    x = g.op("Gather", [g.const("embed_tokens.weight", w["embed_tokens.weight"]), ids], axis=0)
    for i in range(cfg.num_layers if layers is None else layers):
        own = cache if i >= first_layer else {}
        past = p if own else 0
        for name, kind in zip(past_names(i), ("key", "value")):
            constant = own[f"{kind}.{i}"][None] if own else np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
            dims = g.op("Concat", [batch, i64(f"cache_dims_{past}", [cfg.num_kv_heads, past, cfg.head_dim])], axis=0)
            g.op("Expand", [g.const(f"prompt.{name}", f32(constant)), dims], output=name)
        x = decoder_layer(g, w, i, x, cfg, kernels, rope, biases[past], batch, seq)

    if layers is not None:
        g.op("Identity", [x], output=LOWER_OUTPUT)
        return proto(g, LOWER_OUTPUT, ["batch", "seq", cfg.hidden_size])
    x = last_token_features(g, w, x, mask, text_index, cfg, kernels)
    linear(g, {k: f32(v) for k, v in head.items()}, "classifier", x, output=OUTPUT_NAME)  # the encoders' head node
    return proto(g, OUTPUT_NAME, ["batch", head["classifier.bias"].shape[0]])


def causal_text_bias(g: Graph, text_index: str, mask: str) -> tuple:
    """(bias [b, 1, s, s]: the text causal and padded; the 0 and fill constants a prompt's part is made of)."""
    i64 = lambda name, v: g.const(name, np.asarray(v, np.int64))  # noqa: E731
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [text_index, i64("axis0", [0])]),
                                  g.op("Unsqueeze", [text_index, i64("axis1", [1])])])  # [s, s]
    text_mask = g.op("Cast", [g.op("Unsqueeze", [mask, i64("axes12", [1, 2])])], to=TensorProto.BOOL)
    zero, fill = g.const("zero_f", 0.0, np.float32), g.const("mask_fill", MASK_FILL, np.float32)
    return g.op("Where", [g.op("And", [causal, text_mask]), zero, fill]), zero, fill


def last_token_features(g: Graph, w: dict, x: str, mask: str, text_index: str, cfg, kernels) -> str:
    """Each row's last text token (the answer slot) through the final norm: [b, hidden]."""
    last = g.op("ReduceMax", [g.op("Mul", [g.op("Cast", [mask], to=TensorProto.INT64), text_index]),
                              g.const("axis1", np.asarray([1], np.int64))], keepdims=1)  # [b, 1]
    x = g.op("GatherND", [x, last], batch_dims=1)  # [b, h]
    return rms_norm(g, x, g.const("norm.weight", w["norm.weight"]), cfg.rms_norm_eps, kernels.norm)


def proto(g: Graph, output: str, axes: list) -> onnx.ModelProto:
    return model_proto(g, "ptbundle_decoder_classifier", [(n, TensorProto.INT32, ["batch", "seq"]) for n in INPUT_NAMES],
                       [(output, TensorProto.FLOAT, axes)], DECODER_OPSET)


def export_decoder_classifier(net: DecoderClassifier, path, lower: bool = False) -> Path:
    """builder.graphs.targets.export_onnx's part for a DecoderClassifier: writes `path`.  `lower`: the graph of
    net.lower (layers below net.split), which builder.training.forward's layer cache runs."""
    weights = {k: v.asnumpy() for k, v in net.decoder.parameters_and_names()}
    state = net.folded_state()
    head = None if lower else {k: state[k] for k in ("classifier.weight", "classifier.bias")}
    model = classifier_graph(weights, net.decoder.config, {} if lower else net.prompt_cache(), net.spec.positions(),
                             net.split, head, layers=net.split if lower else None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return Path(path)


def multitask_graph(weights: dict, cfg, tables: dict, shape, kernels=KERNELS) -> onnx.ModelProto:
    """builder.models.decoder.DecoderMultiTask as ONNX: classifier_graph with every per-task constant gathered by
    the rows' task_ids [batch] from the task tables (decoder_task_tables): each layer's past, the rows' positions,
    which prompt keys a row sees, and the head."""
    w = {k: f32(v) for k, v in weights.items()}
    g = Graph()
    ids, mask, _ = INPUT_NAMES
    i64 = lambda name, v: g.const(name, np.asarray(v, np.int64))  # noqa: E731
    table = lambda name: g.op("Gather", [g.table_input(name, tables[name], 0), TASK_INPUT], axis=0)  # noqa: E731
    _, q, width, past_from = shape  # decoder_table_shape

    shape = g.op("Shape", [ids])
    batch = g.op("Gather", [shape, i64("zero", [0])], axis=0)
    seq = g.op("Gather", [shape, i64("one", [1])], axis=0)
    scalar = lambda t: g.op("Squeeze", [t, i64("axis0", [0])])  # noqa: E731
    text_index = g.op("Range", [i64("zero_scalar", 0), scalar(seq), i64("one_scalar", 1)])  # [s]
    start = g.op("Unsqueeze", [g.op("Cast", [table("task.text_start")], to=TensorProto.INT64), i64("axis1", [1])])
    positions = g.op("Add", [g.op("Unsqueeze", [text_index, i64("axis0", [0])]), start])  # [b, s]: a row's own
    rope = Rope(g, kernels.rotary, *rotary_tables(cfg), positions)

    text_bias, zero, fill = causal_text_bias(g, text_index, mask)
    visible = g.op("Cast", [table("task.visible")], to=TensorProto.BOOL)  # [b, layers, Q]
    prompt_rows = g.op("Concat", [batch, i64("prompt_bias_dims", [1]), seq, i64("prompt_len", [q])], axis=0)

    x = g.op("Gather", [g.const("embed_tokens.weight", w["embed_tokens.weight"]), ids], axis=0)
    for i in range(cfg.num_layers):
        key, value = past_names(i)
        if i >= past_from:
            past = g.op("Gather", [g.table_input(f"task.past.{i}", tables[f"task.past.{i}"], 1), TASK_INPUT], axis=1)
            g.op("Squeeze", [g.op("Slice", [past, i64("first", [0]), i64("second", [1]), i64("axis0", [0])]),
                             i64("axis0", [0])], output=key)
            g.op("Squeeze", [g.op("Slice", [past, i64("second", [1]), i64("third", [2]), i64("axis0", [0])]),
                             i64("axis0", [0])], output=value)
            seen = g.op("Unsqueeze", [g.op("Gather", [visible, i64(f"layer_{i}", i)], axis=1), i64("axes12", [1, 2])])
            bias = g.op("Concat", [g.op("Expand", [g.op("Where", [seen, zero, fill]), prompt_rows]), text_bias], axis=-1)
        else:
            empty = np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
            dims = g.op("Concat", [batch, i64("cache_dims_0", [cfg.num_kv_heads, 0, cfg.head_dim])], axis=0)
            for name in (key, value):
                g.op("Expand", [g.const("prompt.empty", empty), dims], output=name)
            bias = text_bias
        x = decoder_layer(g, w, i, x, cfg, kernels, rope, bias, batch, seq)

    x = last_token_features(g, w, x, mask, text_index, cfg, kernels)
    logits = g.op("MatMul", [g.op("Unsqueeze", [x, i64("axis1", [1])]), table("task.classifier.weight")],
                  name="classifier")
    g.op("Add", [g.op("Squeeze", [logits, i64("axis1", [1])]), table("task.classifier.bias")], output=OUTPUT_NAME)
    return model_proto(g, "ptbundle_decoder_classifier",
                       [(n, TensorProto.INT32, ["batch", "seq"]) for n in INPUT_NAMES]
                       + [(TASK_INPUT, TensorProto.INT32, ["batch"])],
                       [(OUTPUT_NAME, TensorProto.FLOAT, ["batch", width])], DECODER_OPSET)


def export_decoder_multitask(net: DecoderMultiTask, path) -> Path:
    """builder.graphs.targets.export_onnx's part for a DecoderMultiTask: writes `path`."""
    weights = {k: v.asnumpy() for k, v in net.decoder.parameters_and_names()}
    model = multitask_graph(weights, net.decoder.config, net.tables, net.shape)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return Path(path)
