"""The ONNX graph writers' shared pieces: a node collector (`Graph`), a few layer emitters, and the constants
every writer and cell agrees on (opsets, the masked-score fill)."""

from __future__ import annotations

import numpy as np
# mindspore before onnx: MindSpore's *_pb2 modules need the pure-Python
# protobuf, which it selects (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python)
# only if protobuf is not loaded yet; importing onnx first loads the C one
# and a later `import mindspore` fails with "Descriptors cannot be created directly".
import mindspore  # noqa: F401
import onnx
from onnx import helper, numpy_helper

OPSET = 20  # the encoders' graphs: Gelu (and LayerNormalization, 17)
DECODER_OPSET = 23  # the decoders': RMSNormalization, RotaryEmbedding and Attention with a KV cache (onnxruntime 1.32)
IR_VERSIONS = {20: 9, 23: 10}  # the IR version each opset needs; onnxruntime reads both
CONTRIB = "com.microsoft"  # onnxruntime's fused transformer operators
MASK_FILL = -1e9  # added to masked attention scores by the MindSpore cells and the encoder graph
# The decoder graphs' fill: finite, so an all-masked (padding) row stays finite, and below any real score
# (onnxruntime's Attention adds it to scores already scaled).
DECODER_MASK_FILL = -3.4e38


class Graph:
    """Collects nodes and initializers; every op call returns its output's name."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0
        self.inputs = []  # (name, element type, axes) of inputs beyond the caller's: task tables (table_input)

    def table_input(self, name: str, value: np.ndarray, axis: int) -> str:
        """An input shaped like `value` but for its axis `axis`, which is any length ("tasks"): a merged graph's
        task table (runtime.format), fed by the runtime instead of stored in the graph."""
        if name not in {i[0] for i in self.inputs}:
            dims = [d if k != axis else "tasks" for k, d in enumerate(value.shape)]
            self.inputs.append((name, helper.np_dtype_to_tensor_dtype(value.dtype), dims))
        return name

    def const(self, name: str, value, dtype=None) -> str:
        """An initializer; a name already taken (an emitter used once per task) gets a suffix."""
        taken = {i.name for i in self.initializers}
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), unique))
        return unique

    def op(self, op_type: str, inputs, domain: str = "", name: str | None = None, output: str | None = None,
           outputs: int = 1, **attrs):
        """The node's output name; with `outputs` > 1, a list of that many (the first is `output`, if given)."""
        self.count += 1
        out = output or f"{op_type}_{self.count}"
        names = [out] + [f"{out}_{k}" for k in range(1, outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name or out, domain=domain, **attrs))
        return out if outputs == 1 else names


def f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32))



def layer_norm(g: Graph, w: dict, x: str, name: str, eps: float) -> str:
    """LayerNormalization over the last axis with the FrozenLayerNorm `name` (`name`.gamma, `name`.beta)."""
    return g.op("LayerNormalization", [x, g.const(f"{name}.gamma", w[f"{name}.gamma"]),
                                       g.const(f"{name}.beta", w[f"{name}.beta"])], axis=-1, epsilon=eps)


def linear(g: Graph, w: dict, name: str, x: str, output: str | None = None) -> str:
    """x W^T + b with the Dense weights `name`.weight ([out, in]) and `name`.bias; the MatMul node is `name`."""
    product = g.op("MatMul", [x, g.const(f"{name}.weight", w[f"{name}.weight"].T)], name=name)
    return g.op("Add", [product, g.const(f"{name}.bias", w[f"{name}.bias"])], output=output)




def model_proto(g: Graph, name: str, inputs: list, outputs: list, opset: int = OPSET) -> onnx.ModelProto:
    """The ModelProto of `g`'s nodes and initializers; `inputs`, `outputs`: (name, element type, axes)."""
    info = lambda spec: helper.make_tensor_value_info(*spec)  # noqa: E731
    graph = helper.make_graph(g.nodes, name, [info(i) for i in list(inputs) + g.inputs], [info(o) for o in outputs],
                              g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(CONTRIB, 1)],
                              producer_name="ptbundle")
    model.ir_version = IR_VERSIONS[opset]
    return model
