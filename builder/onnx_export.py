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
The export checks this graph against the MindSpore net (export.check_parity),
so a mistake here fails the build instead of shipping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
# mindspore before onnx: MindSpore's *_pb2 modules need the pure-Python
# protobuf, which it selects (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python)
# only if protobuf is not loaded yet; importing onnx first loads the C one
# and a later `import mindspore` fails with "Descriptors cannot be created directly".
import mindspore  # noqa: F401
import onnx
from onnx import TensorProto, helper, numpy_helper

from ptbundle.runtime.format import INPUT_NAMES

from .pooling import POOLING
from .prompts import PROMPTS, method_for

OUTPUT_NAME = "logits"
OPSET = 20  # Gelu (and LayerNormalization, 17)
CONTRIB = "com.microsoft"  # onnxruntime's fused transformer operators
MASK_FILL = -1e9  # what model.Encoder adds to masked attention scores
HEAD_NODES = ("pooler", "classifier")  # names of the head's MatMul nodes (int8 export keeps them fp32)


class Graph:
    """Collects nodes and initializers; every op call returns its output's name."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def const(self, name: str, value, dtype=None) -> str:
        array = np.asarray(value, dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs, domain: str = "", name: str | None = None, output: str | None = None,
           **attrs) -> str:
        self.count += 1
        out = output or f"{op_type}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name or out, domain=domain, **attrs))
        return out


def f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32))


def weights_of(net) -> dict:
    """The arrays the graph needs, read off a PromptClassifier, under the Encoder's parameter names
    (those the architectures' weight maps fill) and head_params' names: they are also the graph's initializer names."""
    w = {**dict(net.encoder.parameters_and_names()), **net.head_params()}
    return {k: f32(v.asnumpy()) for k, v in w.items()}


def build_graph(weights: dict, config, num_virtual_tokens: int, pooling: str, normalize: bool) -> onnx.ModelProto:
    """The classifier as an onnx.ModelProto: int32 [batch, seq] x3 in, float32 [batch, labels] out."""
    g = Graph()
    h, heads, eps, p = config.hidden_size, config.num_heads, config.layer_norm_eps, num_virtual_tokens
    ids, mask, types = INPUT_NAMES
    one = g.const("one", [1], np.int64)
    shape = g.op("Shape", [ids])
    batch = g.op("Gather", [shape, g.const("zero", [0], np.int64)], axis=0)  # [1]
    seq = g.op("Gather", [shape, one], axis=0)  # [1]

    token_types = "embeddings.token_type" in weights  # an architecture may have none: the input is then unused
    embeds = g.op("Gather", [g.const("embeddings.word", weights["embeddings.word"]), ids], axis=0)  # [b, s, h]
    embeds, full_mask, types = PROMPTS[method_for(p)].onnx(g, weights, embeds, mask, types if token_types else None,
                                                           batch, p)  # builder.prompts
    # Position rows offset .. offset + p + seq (RoBERTa starts after the pad id).
    start = config.position_offset
    end = g.op("Add", [seq, g.const("position_end_offset", [start + p], np.int64)])
    positions = g.op("Slice", [g.const("embeddings.position", weights["embeddings.position"]),
                               g.const("position_start", [start], np.int64), end, g.const("axis0", [0], np.int64)])
    x = g.op("Add", [embeds, positions])
    if token_types:
        table = g.const("embeddings.token_type", weights["embeddings.token_type"])
        x = g.op("Add", [x, g.op("Gather", [table, types], axis=0)])
    x = layer_norm(g, weights, x, "embeddings.norm", eps)

    for i in range(config.num_layers):
        x = encoder_layer(g, weights, i, x, full_mask, heads, eps)

    pooled = POOLING[pooling].onnx(g, weights, x, mask, p)  # builder.pooling
    if normalize:
        norm = g.op("ReduceL2", [pooled, g.const("last_axis", [-1], np.int64)], keepdims=1)
        pooled = g.op("Div", [pooled, g.op("Max", [norm, g.const("norm_floor", 1e-12, np.float32)])])
    linear(g, weights, "classifier", pooled, output=OUTPUT_NAME)

    int_input = lambda name: helper.make_tensor_value_info(name, TensorProto.INT32, ["batch", "seq"])
    graph = helper.make_graph(
        g.nodes, "ptbundle_classifier", [int_input(n) for n in INPUT_NAMES],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", weights["classifier.bias"].shape[0]])],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB, 1)],
                              producer_name="ptbundle")
    model.ir_version = 9  # what opset 20 needs; onnxruntime reads it
    return model


def encoder_layer(g: Graph, w: dict, i: int, x: str, mask: str, heads: int, eps: float) -> str:
    """One transformer layer (post-LayerNorm, as BERT) over x [b, s, h]; weights under model.Layer's names."""
    at, ffn = f"layers.{i}.attention", f"layers.{i}.ffn"
    qkv_weight = g.const(f"{at}.qkv.weight", w[f"{at}.qkv.weight"].T)  # [in, 3 * hidden], as Attention wants
    ctx = g.op("Attention", [x, qkv_weight, g.const(f"{at}.qkv.bias", w[f"{at}.qkv.bias"]), mask], domain=CONTRIB,
               num_heads=heads, mask_filter_value=MASK_FILL)
    x = layer_norm(g, w, g.op("Add", [linear(g, w, f"{at}.out", ctx), x]), f"{at}.norm", eps)
    up = g.op("Gelu", [linear(g, w, f"{ffn}.up", x)])
    return layer_norm(g, w, g.op("Add", [linear(g, w, f"{ffn}.down", up), x]), f"{ffn}.norm", eps)


def layer_norm(g: Graph, w: dict, x: str, name: str, eps: float) -> str:
    """LayerNormalization over the last axis with the FrozenLayerNorm `name` (`name`.gamma, `name`.beta)."""
    return g.op("LayerNormalization", [x, g.const(f"{name}.gamma", w[f"{name}.gamma"]),
                                       g.const(f"{name}.beta", w[f"{name}.beta"])], axis=-1, epsilon=eps)


def linear(g: Graph, w: dict, name: str, x: str, output: str | None = None) -> str:
    """x W^T + b with the Dense weights `name`.weight ([out, in]) and `name`.bias; the MatMul node is `name`."""
    product = g.op("MatMul", [x, g.const(f"{name}.weight", w[f"{name}.weight"].T)], name=name)
    return g.op("Add", [product, g.const(f"{name}.bias", w[f"{name}.bias"])], output=output)


def export_onnx(net, path: Path) -> Path:
    """Write `net` (a PromptClassifier) as ONNX with symbolic batch and sequence axes."""
    model = build_graph(weights_of(net), net.encoder.config, net.num_virtual_tokens, net.pooling, net.normalize)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
