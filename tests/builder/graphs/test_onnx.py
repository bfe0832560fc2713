"""ONNX export: one graph of fused kernels for every batch and sequence length, with the net's logits."""

import subprocess
import sys
from collections import Counter

import os

import numpy as np
import pytest
import mindspore  # before onnx: see the note in builder/onnx_export.py
from mindspore import Tensor
import onnx
from onnx import TensorProto

from ptbundle.builder.backbones.backbone import load_backbone
from ptbundle.builder.models.classifier import PromptClassifier
from ptbundle.builder.graphs.targets import export_onnx
from ptbundle.builder.models.prompts import PromptSpec
from ptbundle.runtime.onnx_backend import OnnxModel
from ptbundle.builder.families.encoder import ENCODER
from checkpoints import random_head

# From the shortest real input ([CLS] x [SEP]) and a single row to a long padded batch.
SHAPES = [(1, 3), (1, 7), (2, 3), (4, 9), (8, 40)]
# (checkpoint, pooling, virtual tokens, prompt method, its layer): every test below runs on each
CASES = [("bert", "mean", 4, "prompt-tuning", 0), ("bert", "cls", 4, "prompt-tuning", 0),
         ("roberta", "cls", 4, "prompt-tuning", 0), ("bert", "cls", 0, "none", 0), ("roberta", "mean", 0, "none", 0),
         ("bert", "mean", 4, "prefix-tuning", 0), ("roberta", "cls", 4, "prefix-tuning", 1),
         ("bert", "mean", 4, "late-prompt", 1)]
NUM_LABELS = 2


def make_net(backbone, pooling, virtual_tokens, method="prompt-tuning", layer=0):
    spec = PromptSpec.of(method, virtual_tokens, layer)
    net = PromptClassifier(ENCODER.model(backbone), virtual_tokens, NUM_LABELS, pooling, spec=spec)
    head = random_head(backbone.config.hidden_size, max(virtual_tokens, 1), NUM_LABELS, seed=2)
    if virtual_tokens == 0:
        head.pop("prompt_embeddings")
    else:  # the prompt's own shape: [P, hidden], or a prefix's [P, layers x 2 x hidden]
        shape = net.prompt.params()["prompt_embeddings"].shape
        head["prompt_embeddings"] = (np.random.RandomState(3).standard_normal(shape) * 0.5).astype(np.float32)
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
    family, pooling, virtual_tokens, method, layer = request.param
    backbone = load_backbone(tiny_bert if family == "bert" else tiny_roberta)
    net = make_net(backbone, pooling, virtual_tokens, method, layer)
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


def test_threads_option(exported):
    backbone, net, path, _ = exported
    ids, mask, types = ragged_batch(np.random.RandomState(1), 2, 6, backbone)
    one, default = OnnxModel(path, threads=1), OnnxModel(path)
    # the session really runs with the thread count asked for; the default is the cores this process may use
    assert one.session.get_session_options().intra_op_num_threads == 1
    assert default.session.get_session_options().intra_op_num_threads == len(os.sched_getaffinity(0))
    np.testing.assert_allclose(one(ids, mask, types), default(ids, mask, types), atol=1e-6)


def test_attention_layer_norm_and_gelu_are_single_kernels(exported):
    """Attention is onnxruntime's fused kernel, LayerNorm and GELU native ops, not op chains."""
    backbone, _, path, _ = exported
    graph = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in graph.node)
    layers = backbone.config.num_layers
    assert ops["Attention"] == ops["Gelu"] == layers
    prefixed = [n for n in graph.node if n.op_type == "Attention" and len(n.input) == 5]  # a prefix enters as `past`
    assert len(prefixed) == (layers - exported[1].spec.layer if exported[1].spec.method == "prefix-tuning" else 0)
    assert ops["LayerNormalization"] == 2 * layers + 1  # + the embeddings'
    assert ops["Softmax"] == ops["Erf"] == ops["Transpose"] == ops["Reshape"] == ops["ReduceMean"] == 0


def quantized(exported):
    """The int8 graph of an exported net, calibrated on random ragged batches (as the exporter does on training texts)."""
    from ptbundle.builder.graphs.quantize import quantize_int8

    backbone, net, path, _ = exported
    int8 = path.with_name("model.int8.onnx")
    if not int8.exists():
        rng = np.random.RandomState(4)
        calibration = [ragged_batch(rng, 8, 16, backbone) for _ in range(4)]
        quantize_int8(path, int8, backbone.config.pad_token_id, {}, calibration=calibration)
    return int8


def test_int8_graph_has_integer_gemms_with_fixed_scales_and_7_bit_weights(exported):
    """The fused graph's GEMMs become int8 ones, nothing else; activations are quantized with constant scales
    (no DynamicQuantizeLinear: its scale would come from the whole batch); every int8 weight lies in -64..64,
    so no pair of u8 x s8 products (2 x 255 x 64 <= 32767) saturates the int16 sums of AVX2's VPMADDUBSW."""
    backbone = exported[0]
    model = onnx.load(str(quantized(exported)))
    ops = Counter(n.op_type for n in model.graph.node)
    layers = backbone.config.num_layers
    assert ops["QAttention"] == layers and ops["MatMulIntegerToFloat"] == 3 * layers  # + output, up, down
    assert ops["QuantizeLinear"] == 4 * layers and ops["DynamicQuantizeLinear"] == 0
    assert ops["DequantizeLinear"] == ops["MatMulInteger"] == 0  # embedding tables stay fp32; GEMMs are fused
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [initializers[n.input[1]] for n in model.graph.node if n.op_type in ("QAttention", "MatMulIntegerToFloat")]
    assert len(weights) == 4 * layers and all(w.dtype == np.int8 for w in weights)
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64


def test_int8_logits_are_close_and_the_same_with_every_kernel(exported):
    """The integer sums are exact, so the deviation from fp32 is the quantization's alone, the same on any
    x86-64 CPU: onnxruntime's non-saturating U8U8 kernels (session.x64quantprecision, which changes the kernel
    on CPUs without VNNI) give the same logits."""
    import onnxruntime as ort

    backbone, _, path, _ = exported
    int8 = quantized(exported)
    ids, mask, types = ragged_batch(np.random.RandomState(3), 4, 12, backbone)
    fp32, q = OnnxModel(path)(ids, mask, types), OnnxModel(int8)(ids, mask, types)
    assert 0 < np.abs(q - fp32).max() < 0.1 * np.abs(fp32).max() + 1e-3
    precise = OnnxModel(int8)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")
    precise.session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(precise(ids, mask, types), q, atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_logits_do_not_depend_on_the_rest_of_the_batch(exported, precision):
    """A row scored alone (padded to its own length) gets the logits it gets inside a longer padded batch."""
    backbone = exported[0]
    model = OnnxModel(quantized(exported) if precision == "int8" else exported[2])
    ids, mask, types = ragged_batch(np.random.RandomState(5), 8, 40, backbone)
    together = model(ids, mask, types)
    for r in range(len(ids)):
        n = int(mask[r].sum())
        alone = model(ids[r : r + 1, :n], mask[r : r + 1, :n], types[r : r + 1, :n])
        np.testing.assert_allclose(alone[0], together[r], atol=1e-5, rtol=0, err_msg=f"row {r}")


def test_onnx_backend_does_not_import_mindspore():
    code = ("import sys, ptbundle.runtime.onnx_backend\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mindspore' or m.startswith('ptbundle.builder')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
