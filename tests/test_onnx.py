"""ONNX export: one graph for every batch and sequence length, with the net's logits."""

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import mindspore  # before onnx: see the note in builder/onnx_export.py
from mindspore import Tensor
import onnx
from onnx import TensorProto, helper, numpy_helper

from ptbundle.builder.backbone import load_backbone
from ptbundle.builder.model import PromptClassifier
from ptbundle.builder.onnx_export import (PROBES, OnnxExportError, erf_free_twin, export_onnx, export_static,
                                          make_dynamic, restore_erf)
from ptbundle.runtime.onnx_backend import OnnxModel
from checkpoints import random_head

# Shapes never seen at export (the probes are (3, 11) and (5, 16)), from the
# shortest real input ([CLS] x [SEP]) and a single row to a long padded batch.
SHAPES = [(1, 3), (1, 7), (2, 3), (4, 9), (8, 40)]
CASES = [("bert", "mean", 4), ("bert", "cls", 4), ("roberta", "cls", 4), ("bert", "cls", 0), ("roberta", "mean", 0)]
NUM_LABELS = 2  # not 3: the batch probe must not collide with a real size (see test_no_baked_probe_shapes)
SHAPE_OPS = {"Reshape", "Slice", "Expand", "Tile", "ConstantOfShape"}


def make_net(backbone, pooling, virtual_tokens):
    net = PromptClassifier(backbone.build_encoder(), virtual_tokens, NUM_LABELS, pooling)
    head = random_head(backbone.config.hidden_size, max(virtual_tokens, 1), NUM_LABELS, seed=2)
    if virtual_tokens == 0:
        head.pop("prompt_embeddings")
    if pooling == "mean":
        head.pop("pooler.weight"), head.pop("pooler.bias")
    net.load_head_state(head)
    net.set_train(False)
    # One dynamic-shape compile instead of one per tested shape (keeps the file fast).
    spec = Tensor(shape=[None, None], dtype=mindspore.int32)
    net.set_inputs(spec, spec, spec)
    return net


def ragged_batch(rng, batch, seq, backbone):
    """Rows of random length >= 3, right-padded; the last row is full, the first (even
    alone: the runtime pads lengths to a multiple of 8) is the shortest."""
    cfg = backbone.config
    lengths = rng.randint(3, seq + 1, batch)
    lengths[-1] = seq
    lengths[0] = 3
    ids = np.full((batch, seq), cfg.pad_token_id, np.int32)
    mask = np.zeros((batch, seq), np.int32)
    types = np.zeros((batch, seq), np.int32)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.randint(5, cfg.vocab_size, n)
        mask[r, :n] = 1
        if cfg.type_vocab_size > 1:  # a second segment, as for sentence pairs
            types[r, n // 2 : n] = 1
    return ids, mask, types


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(map(str, c)))
def exported(request, tmp_path_factory, tiny_bert, tiny_roberta):
    family, pooling, virtual_tokens = request.param
    backbone = load_backbone(tiny_bert if family == "bert" else tiny_roberta)
    net = make_net(backbone, pooling, virtual_tokens)
    path = export_onnx(net, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return backbone, net, path, virtual_tokens


def dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_is_valid_with_symbolic_axes(exported):
    _, _, path, _ = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    assert [(i.name, dims(i)) for i in g.input] == [(n, ["batch", "seq"]) for n in
                                                     ("input_ids", "attention_mask", "token_type_ids")]
    assert all(i.type.tensor_type.elem_type == TensorProto.INT32 for i in g.input)
    assert [(o.name, dims(o)) for o in g.output] == [("logits", ["batch", NUM_LABELS])]
    assert len(g.value_info) == 0


def test_onnxruntime_matches_the_mindspore_net(exported):
    backbone, net, path, _ = exported
    model = OnnxModel(path)
    rng = np.random.RandomState(0)
    for batch, seq in SHAPES:
        ids, mask, types = ragged_batch(rng, batch, seq, backbone)
        expected = net(Tensor(ids), Tensor(mask), Tensor(types)).asnumpy()
        got = model(ids, mask, types)
        assert got.dtype == np.float32 and got.shape == (batch, NUM_LABELS)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=f"shape {(batch, seq)}")


def test_no_baked_probe_shapes(exported):
    """No shape-taking node keeps a constant holding a probe batch or (offset) seq length."""
    backbone, _, path, virtual_tokens = exported
    batch, seq = PROBES[0]
    offset = backbone.config.position_offset
    baked = {batch, seq, seq + virtual_tokens, seq + virtual_tokens + offset}
    g = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
    checked = 0
    for node in g.node:
        if node.op_type in SHAPE_OPS:
            for name in node.input[1:]:  # input 0 is the data
                if name in consts:
                    checked += 1
                    assert not baked & set(consts[name].ravel().tolist()), (node.op_type, node.name, consts[name])
    assert checked > 0


def test_threads_option(exported):
    backbone, net, path, _ = exported
    ids, mask, types = ragged_batch(np.random.RandomState(1), 2, 6, backbone)
    np.testing.assert_allclose(OnnxModel(path, threads=1)(ids, mask, types), OnnxModel(path)(ids, mask, types),
                               atol=1e-6)


def test_polynomial_erf_becomes_native_erf(exported):
    backbone, _, path, _ = exported
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Erf"] == backbone.config.num_layers
    assert ops["Abs"] == ops["Exp"] == ops["Neg"] == 0  # the polynomial is gone, not just bypassed


def test_restore_erf_replaces_only_what_computes_erf(tmp_path, tiny_bert):
    net = make_net(load_backbone(tiny_bert), "mean", 2)
    static = export_static(erf_free_twin(net), tmp_path, *PROBES[0])
    # Spoil one coefficient of the first layer's polynomial (1.061405429): that
    # subgraph no longer computes erf and must stay as it is.
    for node in static.graph.node:
        if node.op_type == "Constant" and np.allclose(numpy_helper.to_array(node.attribute[0].t), 1.061405429):
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(1.07, np.float32)))
            break
    else:
        pytest.fail("no erf coefficient found in the exported graph")
    layers = net.encoder.config.num_layers
    assert restore_erf(static) == layers - 1
    ops = Counter(n.op_type for n in static.graph.node)
    assert ops["Erf"] == layers - 1 and ops["Abs"] == 1
    onnx.checker.check_model(static)


# --- the rewrite on its own, on a hand-made graph ------------------------------------


def toy_static(batch, seq, prefix=2):
    """A static graph baked the way MindSpore bakes it, at one (batch, seq).

    It has a constant-folded [batch, prefix] mask prefix and id prefix, a Slice
    ending at prefix + seq, Reshape targets and an Expand shape holding the
    batch, and inputs under other names than ours.  It computes, per row,
    sum((ids' + 1) * mask') over the prefixed sequence, broadcast to 2 columns,
    plus the row's sum of token types.
    """
    total = prefix + seq
    i64 = lambda v: numpy_helper.from_array(np.asarray(v, np.int64))
    inits = [
        numpy_helper.from_array(np.ones((batch, prefix), np.int32), "mask_prefix"),
        numpy_helper.from_array(np.zeros((batch, prefix), np.int32), "ids_prefix"),
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([total], np.int64), "end"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
        numpy_helper.from_array(np.array([batch, 2], np.int64), "expand_shape"),
        numpy_helper.from_array(np.ones(1, np.float32), "one"),
    ]
    node = helper.make_node
    nodes = [
        node("Concat", ["mask_prefix", "mask"], ["m"], axis=1),
        node("Concat", ["ids_prefix", "ids"], ["i"], axis=1),
        node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
        node("Cast", ["i"], ["if"], to=TensorProto.FLOAT),
        node("Add", ["if", "one"], ["i1"]),
        node("Mul", ["mf", "i1"], ["prod"]),
        node("Slice", ["prod", "start", "end", "axis"], ["sliced"]),
        node("Constant", [], ["shape3"], value=i64([batch, total, 1])),
        node("Reshape", ["sliced", "shape3"], ["r"]),
        node("ReduceSum", ["r"], ["s"], axes=[1, 2], keepdims=0),
        node("Constant", [], ["col"], value=i64([batch, 1])),
        node("Reshape", ["s", "col"], ["s2"]),
        node("Expand", ["s2", "expand_shape"], ["out"]),
        node("Cast", ["types"], ["tf"], to=TensorProto.FLOAT),
        node("ReduceSum", ["tf"], ["tsum"], axes=[1], keepdims=1),
        node("Add", ["out", "tsum"], ["final"]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32, [batch, seq]) for n in ("ids", "mask", "types")]
    output = helper.make_tensor_value_info("final", TensorProto.FLOAT, [batch, 2])
    pinned = [helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch, total, 1])]
    graph = helper.make_graph(nodes, "toy", inputs, [output], inits, value_info=pinned)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def toy_expected(ids, mask, types, prefix=2):
    per_row = ((ids.astype(np.float32) + 1) * mask).sum(1) + prefix  # prefix: id 0, mask 1
    return np.repeat(per_row[:, None], 2, axis=1) + types.sum(1, keepdims=True)


def test_make_dynamic_on_a_hand_made_graph(tmp_path):
    import onnxruntime as ort

    model = make_dynamic(toy_static(*PROBES[0]), toy_static(*PROBES[1]), *PROBES)
    onnx.checker.check_model(model, full_check=True)
    assert [dims(i) for i in model.graph.input] == [["batch", "seq"]] * 3
    assert dims(model.graph.output[0]) == ["batch", 2] and model.graph.output[0].name == "logits"
    assert not model.graph.value_info
    names = {t.name for t in model.graph.initializer}
    assert not names & {"mask_prefix", "ids_prefix", "end", "expand_shape"}  # all rebuilt from Shape
    assert {"start", "axis", "one"} <= names  # static constants stay as they are
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.RandomState(0)
    for batch, seq in [(1, 1), (2, 4), (7, 30)]:
        ids = rng.randint(0, 9, (batch, seq)).astype(np.int32)
        mask = (rng.rand(batch, seq) > 0.3).astype(np.int32)
        types = rng.randint(0, 2, (batch, seq)).astype(np.int32)
        got = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
        np.testing.assert_allclose(got, toy_expected(ids, mask, types), rtol=1e-6)


def test_make_dynamic_refuses_what_it_cannot_explain():
    a, b = toy_static(*PROBES[0]), toy_static(*PROBES[1])
    # a constant equal to batch * seq is neither k * batch nor seq + c
    for model, (batch, seq) in ((a, PROBES[0]), (b, PROBES[1])):
        end = next(t for t in model.graph.initializer if t.name == "end")
        end.CopyFrom(numpy_helper.from_array(np.array([batch * seq], np.int64), "end"))
    with pytest.raises(OnnxExportError, match="neither k \\* batch nor seq \\+ c"):
        make_dynamic(a, b, *PROBES)
    # a float constant that moves with the shape
    a, b = toy_static(*PROBES[0]), toy_static(*PROBES[1])
    one = next(t for t in b.graph.initializer if t.name == "one")
    one.CopyFrom(numpy_helper.from_array(np.full(1, 2.0, np.float32), "one"))
    with pytest.raises(OnnxExportError, match="changes values"):
        make_dynamic(a, b, *PROBES)
    # different structure
    b = toy_static(*PROBES[1])
    b.graph.node.pop()
    with pytest.raises(OnnxExportError, match="differ in structure"):
        make_dynamic(toy_static(*PROBES[0]), b, *PROBES)


def test_onnx_backend_does_not_import_mindspore():
    code = ("import sys, ptbundle.runtime.onnx_backend\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mindspore' or m.startswith('ptbundle.builder')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
