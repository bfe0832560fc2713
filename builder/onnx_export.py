"""ONNX export of a folded classifier, with dynamic batch and sequence axes.

MindSpore's ONNX exporter only writes static shapes: every Reshape target,
the Slice over the position table, the prompt broadcast and the prefixes of
the attention mask and token types come out with the probe batch and sequence
length baked in as constants.  So we export the same net twice, at two probe
shapes, and diff the two graphs: a constant that is equal in both is truly
static, and a constant that differs is a function of batch or seq that we
replace by a small subgraph computing it from `Shape(input_ids)`.

Why two exports rather than one export at "distinctive" sizes: looking for
the value 11 in a graph cannot tell a sequence length from a hidden size, a
head count or a label count that happens to equal it, and real checkpoints
have many small integers.  The diff is exact: it finds precisely the elements
that move with the input shape, whatever their values.  The probes change
batch by 2 and seq by 5, so each moving element can be classified without
ambiguity as `k * batch` (the delta is even and the value a multiple of the
batch) or `seq + c` (the delta is 5; c absorbs the prompt length and the
RoBERTa position offset).  Anything else (a moving float, a moving attribute,
a different graph structure) is refused with an error, never guessed at.

Constants that move are of two kinds:
- integer shape vectors (Reshape targets, Expand shapes, Slice ends): rebuilt
  element by element with Concat;
- data tensors whose extent follows the batch (the all-ones mask prefix and
  all-zeros token-type prefix MindSpore constant-folds to [batch, p]): kept
  as one slice and broadcast with Expand to the dynamic shape, after checking
  the tensor really is constant along the moving axes.

The graph is exported from an erf-free twin of the net (see `model.erf`):
MindSpore's exporter has no Erf, CumSum, Sign or Reciprocal operator.  ONNX
itself has Erf, so once exported, each polynomial erf (about 20 elementwise
operators over the [batch * seq, intermediate] activations, a third of
onnxruntime's time on MiniLM) is put back as one native Erf node; a subgraph is
replaced only after evaluating it and finding it equal to erf within 1e-6.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
# mindspore before onnx: MindSpore's *_pb2 modules need the pure-Python
# protobuf, which it selects (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python)
# only if protobuf is not loaded yet; importing onnx first loads the C one
# and `import mindspore` then fails with "Descriptors cannot be created directly".
import mindspore as ms
import onnx
from mindspore import Tensor
from onnx import helper, numpy_helper

from .model import Encoder, PromptClassifier

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
# (batch, seq) of the two static exports.  Batch moves by an even step and
# seq by an odd one, so `k * batch` and `seq + c` never explain the same delta;
# batch 1 is avoided because exporters like to special-case it.
PROBES = ((3, 11), (5, 16))


class OnnxExportError(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# MindSpore side: the erf-free twin and its static exports


def erf_free_twin(net: PromptClassifier) -> PromptClassifier:
    """The same classifier, built with the polynomial erf the exporter can write."""
    encoder = Encoder(net.encoder.config, erf_free=True)
    # Copied before the twin is wrapped, while its names carry no prefix; the
    # source's names may carry any number of prefixes ("encoder.", a train
    # step's "network."...), so pair by position and check the name's tail.
    mine, theirs = list(encoder.get_parameters()), list(net.encoder.get_parameters())
    if len(mine) != len(theirs):
        raise OnnxExportError(f"encoder has {len(theirs)} parameters, its erf-free twin {len(mine)}")
    for target, source in zip(mine, theirs):
        if not (source.name == target.name or source.name.endswith("." + target.name)):
            raise OnnxExportError(f"parameter order differs: {source.name} vs {target.name}")
        if tuple(source.shape) != tuple(target.shape):
            raise OnnxExportError(f"{source.name}: shape {tuple(source.shape)} vs {tuple(target.shape)}")
        target.set_data(Tensor(source.asnumpy()))
    num_labels = net.classifier.weight.shape[0]
    twin = PromptClassifier(encoder, net.num_virtual_tokens, num_labels, net.pooling, net.normalize)
    twin.load_head_state(net.head_state())
    twin.set_train(False)
    return twin


def export_static(net: PromptClassifier, directory: Path, batch: int, seq: int) -> onnx.ModelProto:
    ids = Tensor(np.zeros((batch, seq), np.int32))
    stem = Path(directory) / f"static-{batch}x{seq}"
    ms.export(net, ids, ids, ids, file_name=str(stem), file_format="ONNX")
    return onnx.load(str(stem.with_suffix(".onnx")))


def export_onnx(net: PromptClassifier, path: Path) -> Path:
    """Write `net` as ONNX with inputs [batch, seq] and output [batch, num_labels]."""
    path = Path(path)
    twin = erf_free_twin(net)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = [export_static(twin, Path(tmp), b, s) for b, s in PROBES]
    model = make_dynamic(graphs[0], graphs[1], PROBES[0], PROBES[1])
    restore_erf(model)
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------
# ONNX side: two static graphs -> one dynamic graph (no MindSpore needed)


def classify(a: int, b: int, probe_a, probe_b):
    """How one integer moves between the probes: None (static), ("batch", k) or ("seq", c)."""
    (ba, sa), (bb, sb) = probe_a, probe_b
    if a == b:
        return None
    if b - a == sb - sa:
        return ("seq", a - sa)
    if (b - a) % (bb - ba) == 0:
        k = (b - a) // (bb - ba)
        if a == k * ba and b == k * bb:
            return ("batch", k)
    raise OnnxExportError(f"a constant is {a} at {probe_a} and {b} at {probe_b}: "
                          "neither k * batch nor seq + c")


def constants(graph: onnx.GraphProto) -> dict:
    """name -> array for every initializer and Constant node output."""
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            attr = node.attribute[0]
            if attr.name != "value":
                raise OnnxExportError(f"Constant {node.name}: unsupported attribute {attr.name}")
            found[node.output[0]] = numpy_helper.to_array(attr.t)
    return found


def check_same_structure(a: onnx.GraphProto, b: onnx.GraphProto) -> None:
    """The probes must differ in constants only; anything else is not ours to patch."""
    if len(a.node) != len(b.node):
        raise OnnxExportError(f"the probe exports differ in structure ({len(a.node)} vs {len(b.node)} nodes)")
    for x, y in zip(a.node, b.node):
        if (x.op_type, list(x.input), list(x.output)) != (y.op_type, list(y.input), list(y.output)):
            raise OnnxExportError(f"the probe exports differ at node {x.name} ({x.op_type} vs {y.op_type})")
        if x.op_type != "Constant" and list(x.attribute) != list(y.attribute):
            raise OnnxExportError(f"node {x.name} ({x.op_type}) has an attribute that depends on the input shape")
    if [t.name for t in a.initializer] != [t.name for t in b.initializer]:
        raise OnnxExportError("the probe exports have different initializers")
    if [i.name for i in a.input] != [i.name for i in b.input] or len(a.output) != len(b.output):
        raise OnnxExportError("the probe exports have different inputs or outputs")


class ShapeBuilder:
    """Emits the nodes computing shape vectors from Shape(input_ids), shared and cached."""

    def __init__(self, source: str):
        self.nodes, self.initializers, self.cache = [], [], {}
        self.count = 0
        shape = self.node("Shape", [source])
        self.dims = {"batch": self.node("Gather", [shape, self.const([0])], axis=0),
                     "seq": self.node("Gather", [shape, self.const([1])], axis=0)}

    def fresh(self) -> str:
        self.count += 1
        return f"dyn/{self.count}"

    def const(self, values, dtype=np.int64) -> str:
        key = ("const", np.dtype(dtype).str, tuple(np.asarray(values).ravel().tolist()), np.shape(values))
        if key not in self.cache:
            name = self.fresh()
            self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype), name))
            self.cache[key] = name
        return self.cache[key]

    def node(self, op: str, inputs, **attrs) -> str:
        out = self.fresh()
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def dim(self, kind: str, param: int) -> str:
        """1-D int64 [1]: k * batch or seq + c."""
        key = ("dim", kind, param)
        if key not in self.cache:
            base = self.dims[kind]
            if kind == "batch":
                self.cache[key] = base if param == 1 else self.node("Mul", [base, self.const([param])])
            else:
                self.cache[key] = base if param == 0 else self.node("Add", [base, self.const([param])])
        return self.cache[key]

    def vector(self, elements, dtype, scalar: bool = False) -> str:
        """A shape vector whose elements are ints or ("batch"|"seq", param) pairs."""
        key = ("vector", tuple(elements), np.dtype(dtype).str, scalar)
        if key in self.cache:
            return self.cache[key]
        pieces, run = [], []
        for e in elements:
            if isinstance(e, tuple):
                if run:
                    pieces.append(self.const(run))
                    run = []
                pieces.append(self.dim(*e))
            else:
                run.append(e)
        if run:
            pieces.append(self.const(run))
        out = pieces[0] if len(pieces) == 1 else self.node("Concat", pieces, axis=0)
        if np.dtype(dtype) != np.int64:
            out = self.node("Cast", [out], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        if scalar:
            out = self.node("Reshape", [out, self.const(np.zeros(0, np.int64))])
        self.cache[key] = out
        return out

    def expand(self, value: np.ndarray, shape: str) -> str:
        return self.node("Expand", [self.const(value, value.dtype), shape])


def dynamic_tensor(name, a: np.ndarray, b: np.ndarray, probes, builder: ShapeBuilder) -> str:
    """The name of a subgraph computing constant `name` for any input shape."""
    if a.shape == b.shape:
        if a.ndim > 1 or not np.issubdtype(a.dtype, np.integer):
            raise OnnxExportError(f"constant {name} {a.shape} {a.dtype} changes values with the input shape")
        elements = [classify(int(x), int(y), *probes) or int(x) for x, y in zip(a.ravel(), b.ravel())]
        return builder.vector(elements, a.dtype, scalar=a.ndim == 0)
    # A data tensor whose extent moves: it must be a broadcast of one slice.
    if a.ndim != b.ndim:
        raise OnnxExportError(f"constant {name} changes rank with the input shape ({a.shape} vs {b.shape})")
    moving = [axis for axis in range(a.ndim) if a.shape[axis] != b.shape[axis]]
    core = a[tuple(slice(0, 1) if axis in moving else slice(None) for axis in range(a.ndim))]
    if not (np.array_equal(np.broadcast_to(core, a.shape), a) and np.array_equal(np.broadcast_to(core, b.shape), b)):
        raise OnnxExportError(f"constant {name} {a.shape} is not constant along its batch/seq axes")
    shape = [classify(x, y, *probes) or x for x, y in zip(a.shape, b.shape)]
    return builder.expand(core, builder.vector(shape, np.int64))


def rename_tensors(graph: onnx.GraphProto, renames: dict) -> None:
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(graph.input) + list(graph.output):
        value.name = renames.get(value.name, value.name)


def set_dims(value: onnx.ValueInfoProto, dims) -> None:
    """dims: ints (static) or strings (symbolic)."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def symbolic_dims(a_value, b_value, probes) -> list:
    dims = []
    for x, y in zip(a_value.type.tensor_type.shape.dim, b_value.type.tensor_type.shape.dim):
        if x.dim_param:
            dims.append(x.dim_param)
            continue
        moved = classify(x.dim_value, y.dim_value, *probes)
        if moved is None:
            dims.append(x.dim_value)
        elif moved in (("batch", 1), ("seq", 0)):
            dims.append(moved[0])
        else:
            dims.append(f"{moved[0]}_{moved[1]}")  # never seen here; named, not pinned
    return dims


def make_dynamic(static_a: onnx.ModelProto, static_b: onnx.ModelProto, probe_a, probe_b) -> onnx.ModelProto:
    """One dynamic model from two static exports of the same net at (batch, seq) probes."""
    a, b = static_a.graph, static_b.graph
    check_same_structure(a, b)
    if len(a.input) != len(INPUT_NAMES) or len(a.output) != 1:
        raise OnnxExportError(f"expected 3 inputs and 1 output, got {len(a.input)} and {len(a.output)}")
    probes = (tuple(probe_a), tuple(probe_b))
    model = onnx.ModelProto()
    model.CopyFrom(static_a)
    graph = model.graph
    in_dims = [symbolic_dims(x, y, probes) for x, y in zip(a.input, b.input)]
    out_dims = symbolic_dims(a.output[0], b.output[0], probes)

    renames = {v.name: new for v, new in zip(graph.input, INPUT_NAMES)}
    renames[graph.output[0].name] = OUTPUT_NAME
    rename_tensors(graph, renames)

    builder = ShapeBuilder(INPUT_NAMES[0])
    values_a, values_b = constants(a), constants(b)
    replaced = {}  # constant name -> name of the tensor computing it
    for name, value in values_a.items():
        other = values_b[name]
        if value.shape != other.shape or not np.array_equal(value, other):
            replaced[renames.get(name, name)] = dynamic_tensor(name, value, other, probes, builder)

    kept_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in replaced)]
    kept_inits = [t for t in graph.initializer if t.name not in replaced]
    for node in kept_nodes:
        node.input[:] = [replaced.get(n, n) for n in node.input]
    del graph.node[:]
    graph.node.extend(builder.nodes + kept_nodes)  # the shape subgraph needs only the inputs
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + builder.initializers)
    inputs = [v for v in graph.input if v.name not in replaced]  # old IRs list initializers as inputs
    del graph.input[:]
    graph.input.extend(inputs)

    for value, dims in zip(graph.input, in_dims):
        set_dims(value, dims)
    set_dims(graph.output[0], out_dims)
    # Shapes recorded at the probe would pin dimensions; onnxruntime infers its own.
    del graph.value_info[:]
    return model


# ---------------------------------------------------------------------------
# Native Erf in place of the polynomial the exporter needed

ELEMENTWISE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
               "Abs": np.abs, "Neg": np.negative, "Exp": np.exp, "Cast": lambda v: v}
# From Abs(x), the chain to the result of `model.erf`: sign * (1 - poly * exp(-a * a)).
ERF_CHAIN = ("Neg", "Mul", "Exp", "Mul", "Sub", "Mul")


def evaluate(name, x, x_value, consts, producer, memo):
    """Value of tensor `name` as a function of tensor `x` alone, over the elementwise
    ops above; LookupError if it depends on anything else."""
    if name == x:
        return x_value
    if name in consts:
        return consts[name].astype(np.float64)
    if name not in memo:
        node = producer.get(name)
        if node is None or node.op_type not in ELEMENTWISE:
            raise LookupError(name)
        args = [evaluate(i, x, x_value, consts, producer, memo) for i in node.input]
        memo[name] = ELEMENTWISE[node.op_type](*args)
    return memo[name]


def restore_erf(model: onnx.ModelProto) -> int:
    """Replace every polynomial erf subgraph by an Erf node; returns how many."""
    graph = model.graph
    consts = constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def follow(name, op):
        found = [n for n in consumers.get(name, ()) if n.op_type == op]
        return found[0].output[0] if len(found) == 1 else None

    xs = np.linspace(-6.0, 6.0, 2401)
    reference = np.array([math.erf(v) for v in xs])
    erf_of = {}  # output of a polynomial erf -> its input
    for node in graph.node:
        if node.op_type != "Abs":
            continue
        name = node.output[0]
        for op in ERF_CHAIN:
            name = name and follow(name, op)
        if not name:
            continue
        try:
            value = evaluate(name, node.input[0], xs, consts, producer, {})
        except (LookupError, ValueError):  # not a function of x alone
            continue
        if np.shape(value) == xs.shape and np.abs(value - reference).max() < 1e-6:
            erf_of[name] = node.input[0]
    if not erf_of:
        return 0
    nodes = [helper.make_node("Erf", [erf_of[n.output[0]]], [n.output[0]], name=n.output[0] + "/erf")
             if n.output and n.output[0] in erf_of else n for n in graph.node]
    remove_dead_nodes(graph, nodes)
    return len(erf_of)


def remove_dead_nodes(graph: onnx.GraphProto, nodes) -> None:
    """Keep `nodes` that feed the outputs, and the initializers they read."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {name for node in nodes for name in node.input}
        alive = [node for node in nodes if any(out in used for out in node.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
