"""The int8 copy of a bundle's ONNX graph: 7-bit weights, fixed activation scales.

Two properties hold on every x86-64 CPU, whatever GEMM kernel onnxruntime's
MLAS picks there:

* No int16 saturation.  Activations are uint8 (0..255) and weights int8; on
  CPUs without AVX-512 VNNI / AVX-VNNI the U8S8 kernel multiplies with
  VPMADDUBSW, whose sum of two u8 x s8 products saturates at 32767 when the
  weights use the full -127..127 (2 x 255 x 127 = 64770).  With 7-bit weights
  (`reduce_range`: -64..64) a pair is at most 2 x 255 x 64 = 32640, so AVX2,
  AVX-512 and VNNI kernels compute the same exact int32 sums.
* A row's logits do not depend on the rows that share its batch.  Dynamic
  quantization (DynamicQuantizeLinear) takes one activation scale per call
  from the whole padded batch; here each quantized activation gets a fixed
  scale and zero point, measured once on calibration batches (training
  texts), so an int8 input is the same whichever batch carries it.

The graph is onnxruntime's dynamic quantization of the encoder's GEMMs
(MatMul and the fused com.microsoft.Attention, which becomes QAttention),
with each DynamicQuantizeLinear then replaced by a QuantizeLinear of constant
scale.  quantize_static cannot take this route: neither its QDQ nor its
QOperator registry knows Attention, so it would leave the QKV projections
(a quarter of the GEMM work) in fp32.  bench/int8_choice.py measures the
candidates (accuracy, speed, batch independence).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import mindspore  # noqa: F401  (before onnx: see builder.models.onnx_ops)
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from ptbundle.runtime.bundle import batched_logits
from ptbundle.runtime.format import INPUT_NAMES
from ptbundle.runtime.metrics import classification_metrics
from ptbundle.runtime.errors import BundleError
from ptbundle.runtime.onnx_backend import OnnxModel
from ptbundle.runtime.openvino_backend import OpenVinoModel
from ptbundle.runtime.text import batch_indices, pad

from ..errors import ExportError
from .onnx_encoder import HEAD_NODES

QUANTIZED_OPS = ("MatMul", "Attention")  # the encoder's GEMMs; Gather (embedding tables) and the head stay fp32
CALIBRATION_TEXTS = 512  # training texts whose activations fix the scales
CALIBRATION_BATCH = 64


def calibration_sample(items: list, count: int = CALIBRATION_TEXTS) -> list:
    """`count` evenly spaced items (all lengths, all labels, in file order)."""
    return list(items[:: max(1, len(items) // count)])[:count]


def calibration_batches(encodings, pad_id: int, batch_size: int = CALIBRATION_BATCH) -> list:
    """Padded (ids, mask, types) int32 batches of the encodings, length-sorted as the runtime batches."""
    return [pad([encodings[i] for i in index], pad_id)
            for index in batch_indices([len(e.ids) for e in encodings], batch_size)]


def quantize_weights(onnx_path: Path, out_path: Path, reduce_range: bool = True, weight_type=None,
                     per_channel: bool = True, exclude=HEAD_NODES) -> None:
    """onnxruntime's dynamic quantization of the graph's GEMMs (activations scaled per call); the nodes named
    in `exclude` (the head) stay fp32."""

    # An encoder's attention is com.microsoft.Attention (QKV GEMM inside: it becomes QAttention); a decoder's
    # is the standard opset-23 Attention over projected heads, which onnxruntime's quantizer would mistake
    # for it, so there only its MatMuls are quantized.
    contrib_attention = any(n.op_type == "Attention" and n.domain == "com.microsoft"
                            for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)
    ops = QUANTIZED_OPS if contrib_attention else ("MatMul",)
    # One scale per weight column: columns of different range each keep their
    # precision, at the same speed.  Shape inference cannot type the outputs
    # of onnxruntime's contrib ops; all are float.
    with quiet_preprocessing_advice():
        quantize_dynamic(str(onnx_path), str(out_path), weight_type=weight_type or QuantType.QInt8,
                         per_channel=per_channel, reduce_range=reduce_range, op_types_to_quantize=list(ops),
                         nodes_to_exclude=list(exclude), extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


class PreprocessingAdvice(logging.Filter):
    """onnxruntime's quantizer logs, on the root logger, advice to run its pre-processing script (an example
    for image models) on every call: nothing a pt-build user can act on, so it is not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def quiet_preprocessing_advice():
    root, advice = logging.getLogger(), PreprocessingAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def activation_ranges(onnx_path: Path, names, calibration) -> dict:
    """{tensor: (min, max)} of fp32 activations over the real (unpadded) tokens of the calibration batches.

    The soft prompt's positions come first in the encoder's sequence and are
    always attended, so a [batch, P + seq, ...] activation's valid rows are
    the P prompt rows and the masked-in text rows.
    """

    model = onnx.load(str(onnx_path))
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calibrate.onnx"
        onnx.save(model, str(path))
        session = OnnxModel(path).session
    inputs = [i.name for i in session.get_inputs()]
    ranges = {name: (np.inf, -np.inf) for name in names}
    for ids, mask, types in calibration:
        feed = {k: v for k, v in zip(INPUT_NAMES, (ids, mask, types)) if k in inputs}
        values = session.run(list(names), feed)
        for name, value in zip(names, values):
            prefix = value.shape[1] - mask.shape[1]
            valid = np.concatenate([np.ones((mask.shape[0], prefix), bool), mask.astype(bool)], axis=1)
            rows = value[valid]
            lo, hi = ranges[name]
            ranges[name] = (min(lo, float(rows.min())), max(hi, float(rows.max())))
    return ranges


def activation_roles(model: onnx.ModelProto, exclude=HEAD_NODES) -> dict:
    """{activation tensor: role} of every tensor a quantized GEMM reads, its role the names of the GEMM nodes
    that read it ("layers.3.ffn.up"): the same in a one-task graph and in a merged one, so ranges measured on
    one task's graph carry over to a merge of it (builder.pipelines.merge)."""
    constants = {t.name for t in model.graph.initializer}
    readers = {}
    for node in model.graph.node:
        quantized = node.op_type == "MatMul" or (node.op_type == "Attention" and node.domain == "com.microsoft")
        if quantized and node.name not in exclude and node.input[0] not in constants:
            readers.setdefault(node.input[0], []).append(node.name)
    return {tensor: "+".join(sorted(names)) for tensor, names in readers.items()}


def calibration_ranges(onnx_path: Path, calibration) -> dict:
    """{role: [min, max]} of every quantized activation over the calibration batches (activation_ranges), by
    role: what a bundle records (its task's details[CALIBRATION_DETAIL]) so that a merge can fix its scales
    without the training data."""
    roles = activation_roles(onnx.load(str(onnx_path), load_external_data=False))
    ranges = activation_ranges(onnx_path, list(roles), calibration)
    return {roles[t]: [float(lo), float(hi)] for t, (lo, hi) in ranges.items()}


def fix_activation_scales(dynamic_path: Path, fp32_path: Path, out_path: Path, calibration=None,
                          ranges: dict | None = None) -> int:
    """Replace every DynamicQuantizeLinear of `dynamic_path` by a QuantizeLinear of constant scale.

    Scale and zero point are DynamicQuantizeLinear's own formula (uint8, range
    stretched to include 0) applied to the calibration range: measured on
    `calibration` batches, or `ranges` by role (calibration_ranges) as
    recorded; values outside it saturate at 0 or 255.  Returns the number of
    nodes replaced.
    """

    model = onnx.load(str(dynamic_path))
    roles = activation_roles(onnx.load(str(fp32_path), load_external_data=False))
    ranges = ranges if ranges is not None else calibration_ranges(fp32_path, calibration)
    nodes, replaced = [], 0
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        replaced += 1
        role = roles.get(node.input[0])
        if role not in ranges:
            raise ExportError(f"no calibration range for the activation {role or node.input[0]} that int8 quantizes")
        lo, hi = ranges[role]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = np.float32((hi - lo) / 255.0 if hi > lo else 1.0)
        zero_point = np.uint8(np.clip(np.round(-lo / scale), 0, 255))
        quantized, scale_name, zero_point_name = node.output
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                                        numpy_helper.from_array(np.array(zero_point, np.uint8), zero_point_name)])
        nodes.append(helper.make_node("QuantizeLinear", [node.input[0], scale_name, zero_point_name], [quantized],
                                      name=node.name))
    del model.graph.node[:]
    model.graph.node.extend(fuse_integer_matmuls(nodes))
    onnx.save(model, str(out_path))
    return replaced


def fuse_integer_matmuls(nodes: list) -> list:
    """MatMulInteger -> Cast -> Mul(a_scale x b_scale) chains as single com.microsoft.MatMulIntegerToFloat nodes.

    onnxruntime fuses the dynamic graph's chains itself (DynamicQuantizeMatMul)
    but not these: it folds the constant scale product first, and the
    pattern no longer matches.  Unfused, the int32 product makes two more
    passes through memory.
    """

    producer = {out: n for n in nodes for out in n.output}
    consumers = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    fused, dropped = {}, set()
    for n in nodes:
        if n.op_type != "MatMulInteger" or len(n.input) != 4:
            continue
        (cast, *more) = consumers.get(n.output[0], [None])
        if more or cast is None or cast.op_type != "Cast":
            continue
        (mul, *more) = consumers.get(cast.output[0], [None])
        if more or mul is None or mul.op_type != "Mul":
            continue
        scales = producer.get(next(i for i in mul.input if i != cast.output[0]))
        if scales is None or scales.op_type != "Mul" or len(consumers[scales.output[0]]) != 1:
            continue
        a, b, a_zero_point, b_zero_point = n.input
        a_scale, b_scale = scales.input
        fused[id(n)] = helper.make_node("MatMulIntegerToFloat", [a, b, a_scale, b_scale, a_zero_point, b_zero_point],
                                        [mul.output[0]], name=n.name, domain="com.microsoft")
        dropped.update((id(cast), id(mul), id(scales)))
    return [fused.get(id(n), n) for n in nodes if id(n) not in dropped]


@dataclass(frozen=True)
class Int8Inputs:
    """What the int8 graph is made and judged with."""

    calibration: list  # padded (ids, mask, types) int32 batches of training texts (calibration_batches)
    eval_sets: dict  # split -> (encodings, gold label ids, num_labels)
    ranges: dict | None = None  # or the activation ranges by role, recorded (a merge: union_ranges of its tasks')


def quantize_int8(onnx_path: Path, int8_path: Path, pad_id: int, eval_sets: dict, calibration: list | None = None,
                  ranges: dict | None = None) -> dict:
    """int8 copy of the ONNX graph (7-bit weights, fixed activation scales), and its accuracy per split.

    The scales are fixed on `calibration`, batches of training texts (or on
    `ranges` measured on them, calibration_ranges): never on the splits the
    graph is then judged on.  fp32 needs no second
    evaluation: the parity check has shown model.onnx equal to the trained
    net, whose metrics the manifest already holds.
    """
    int8_path = Path(int8_path)
    dynamic = int8_path.with_name(f".{int8_path.name}.dynamic")
    try:
        quantize_weights(onnx_path, dynamic)
        fix_activation_scales(dynamic, onnx_path, int8_path, calibration, ranges)
    finally:
        dynamic.unlink(missing_ok=True)
    report = {}
    model = OnnxModel(int8_path) if eval_sets else None  # a merge scores nothing here (its graph takes tables)
    for split, (encodings, gold, num_labels) in eval_sets.items():
        predicted = batched_logits(model, encodings, pad_id, num_labels).argmax(-1)
        report[split] = classification_metrics(predicted, gold, num_labels)
    return report


def bf16_report(onnx_path: Path, pad_id: int, eval_sets: dict) -> dict:
    """model.onnx in bf16 on this CPU's bf16 units (the openvino backend), judged like int8 on the same splits:
    accuracy per split and the largest logit difference from fp32; or why it was not measured (no OpenVINO, a
    CPU without bf16 units), so the manifest says so instead of staying silent."""
    try:
        bf16 = OpenVinoModel(onnx_path, precision="bf16")
    except BundleError as e:
        return {"not_measured": str(e)}
    fp32 = OnnxModel(onnx_path)
    report, worst = {}, {}
    for split, (encodings, gold, num_labels) in eval_sets.items():
        got = batched_logits(bf16, encodings, pad_id, num_labels)
        worst[split] = round(float(np.abs(got - batched_logits(fp32, encodings, pad_id, num_labels)).max()), 6)
        report[split] = classification_metrics(got.argmax(-1), gold, num_labels)
    return {**report, "max_abs_logit_diff": worst, "backend": f"openvino {OpenVinoModel.version}"}


# --- block-wise weights (generation graphs) --------------------------------------------------------------------

def blockwise_weights(onnx_path, out_path: Path, bits: int = 8, block_size: int = 32, exclude=()) -> int:
    """Every MatMul by a constant [K, N] weight (but the nodes named in `exclude`) as onnxruntime's
    com.microsoft.MatMulNBits: `bits`-bit weights in blocks of `block_size` along K, one scale per block
    (symmetric, the default zero point 2^(bits-1)), accuracy_level 4: at run time each row's activations are
    quantized to int8 per block of K too.  Per-tensor activation scales fail a decoder (SmolLM2's SwiGLU output
    has outliers hundreds of times its median: one scale for the whole row rounds the rest to a few levels);
    here an outlier spoils only its own block, and every row's scales are its own, so no row depends on its
    batch.  `onnx_path` may be a loaded ModelProto (changed in place).  Returns the number of MatMuls replaced.
    bench/experiments/int8_decoder.py chose the block size."""

    if bits not in (4, 8) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"blockwise_weights: bits 4 or 8 and a power-of-two block of at least 16, not {bits}/{block_size}")
    model = onnx_path if isinstance(onnx_path, onnx.ModelProto) else onnx.load(str(onnx_path))
    weights = {t.name: t for t in model.graph.initializer}
    used = {}
    for node in model.graph.node:
        for name in node.input:
            used[name] = used.get(name, 0) + 1
    nodes, replaced = [], 0
    for node in model.graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or node.name in exclude or len(weight.dims) != 2:
            nodes.append(node)
            continue
        packed, scales = pack_blocks(numpy_helper.to_array(weight).astype(np.float32), bits, block_size)
        k, n = weight.dims
        prefix = node.name or weight.name
        model.graph.initializer.extend([numpy_helper.from_array(packed, f"{prefix}.q{bits}"),
                                        numpy_helper.from_array(scales, f"{prefix}.scales")])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{prefix}.q{bits}", f"{prefix}.scales"],
                                      list(node.output), name=node.name, domain="com.microsoft", K=k, N=n, bits=bits,
                                      block_size=block_size, accuracy_level=4))
        replaced += 1
        used[weight.name] -= 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if used.get(t.name, 1) > 0]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out_path))
    return replaced


def pack_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple:
    """[K, N] float weights -> (uint8 [N, K / block, block * bits / 8], float32 [N * K / block] scales), as
    MatMulNBits reads them: column n's blocks along K, zero point 2^(bits-1), two 4-bit values a byte (low first).
    K is zero-padded to whole blocks."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    w = np.zeros((n, blocks * block_size), np.float32)
    w[:, :k] = weight.T
    w = w.reshape(n, blocks, block_size)
    top = 2 ** (bits - 1) - 1
    scales = np.abs(w).max(-1) / top
    scales[scales == 0] = 1.0
    q = (np.clip(np.rint(w / scales[..., None]), -top, top) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q), scales.astype(np.float32).reshape(-1)
