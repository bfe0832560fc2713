"""Which onnxruntime kernel runs a folded prefix fastest, and what runs in a bundle's graph.

    .venv/bin/python bench/perf/prefix_attention.py [--backbone DIR] [--data mr] [--repeats 50]
        [--bundle exports/mr-soft]

A prefix (--method prefix-tuning) puts P constant keys and values in front
of each layer's own.  model.onnx feeds them to onnxruntime's fused
`Attention` as its `past` input (builder/onnx_export.encoder_layer); issue 11
asked whether `MultiHeadAttention` with `past_key`/`past_value`, or the
keys concatenated in front before it, is faster.  Each row is one layer's
attention (QKV projection included, as `Attention` includes it) over
[64, tokens, hidden] with the keys' mask as an input, as the bundle runs it:
tokens is --data's mean text length, P the default recipe's virtual tokens.
The rows must agree (max |difference| printed); "ops run" is what
onnxruntime's optimizer left (the runtime's session options).

With --bundle: the op types onnxruntime runs in that bundle's model.onnx and
model.int8.onnx after its optimizer, so the fused attention count can be
read against the layer count.
Writes <results>/prefix_attention.json.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402
import roofline  # noqa: E402

import mindspore  # noqa: E402,F401  before onnx: both bundle protobuf, MindSpore's must load first
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

BATCH = 64  # the bench's batch
MASK_FILL = common.ENCODER_MASK_FILL  # what model.onnx adds to masked scores


def variants(hidden: int, heads: int, prefix: int):
    """(name, nodes, constants) of one layer's prefix attention; graph inputs x [B, T, H] and mask [B, T]."""
    d = hidden // heads
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((hidden, 3 * hidden)) / np.sqrt(hidden)).astype(np.float32)
    b = (rng.standard_normal(3 * hidden) * 0.1).astype(np.float32)
    keys, values = rng.standard_normal((2, 1, heads, prefix, d)).astype(np.float32)  # [1, heads, P, d] each
    node = helper.make_node
    const = numpy_helper.from_array
    i64 = lambda name, v: const(np.array(v, np.int64), name)  # noqa: E731
    # The keys' mask [B, P + T]: P ones, then the text's own (as builder/onnx_export.prefix_rows writes it).
    keys_mask = [node("Shape", ["x"], ["batch"], end=1), node("Concat", ["batch", "p_len"], ["ones_shape"], axis=0),
                 node("Expand", ["one", "ones_shape"], ["ones"]), node("Concat", ["ones", "mask"], ["keys_mask"], axis=1)]
    base = [i64("p_len", [prefix]), const(np.ones((1, 1), np.int32), "one"), const(w, "w"), const(b, "b")]
    expand = lambda source, dims, out: [node("Concat", ["batch", dims], [f"{out}_shape"], axis=0),  # noqa: E731
                                        node("Expand", [source, f"{out}_shape"], [out])]

    # What model.onnx runs: Attention projects Q, K and V itself; past [2, B, heads, P, d] from one constant.
    yield ("Attention, prefix as past (model.onnx)", keys_mask + [
        node("Concat", ["two", "batch", "past_dims"], ["past_shape"], axis=0),
        node("Expand", ["past_const", "past_shape"], ["past"]),
        node("Attention", ["x", "w", "b", "keys_mask", "past"], ["y", "present"], domain="com.microsoft",
             num_heads=heads, mask_filter_value=MASK_FILL)],
        base + [const(np.stack([keys, values]), "past_const"), i64("two", [2]), i64("past_dims", [heads, prefix, d])])

    # MultiHeadAttention takes projected Q, K, V (it adds their bias itself) and the prefix as past_key/past_value.
    # Its CPU kernel joins the past to the keys only while writing `present`: without those outputs it ignores
    # the prefix silently (onnxruntime 1.32; this script's max |difference| showed 2.6).
    projection = [node("MatMul", ["x", "w"], ["xw"]), node("Split", ["xw"], ["q", "k", "v"], axis=-1, num_outputs=3)]
    yield ("MatMul, MultiHeadAttention past_key/past_value", keys_mask + projection
           + expand("past_key_const", "past_dims", "past_key") + expand("past_value_const", "past_dims", "past_value")
           + [node("MultiHeadAttention", ["q", "k", "v", "b", "keys_mask", "", "past_key", "past_value"],
                   ["y", "present_key", "present_value"],
                   domain="com.microsoft", num_heads=heads, mask_filter_value=MASK_FILL)],
           base + [const(keys, "past_key_const"), const(values, "past_value_const"), i64("past_dims", [heads, prefix, d])])

    # The prefix's keys and values concatenated in front of the projected ones, [B, P + T, hidden].
    flat = lambda a: np.ascontiguousarray(a[0].transpose(1, 0, 2).reshape(1, prefix, hidden))  # noqa: E731
    # (MultiHeadAttention's bias would reach the prefix too: added before the Concat instead.)
    yield ("MatMul, Concat prefix, MultiHeadAttention", keys_mask
           + [node("MatMul", ["x", "w"], ["xw"]), node("Add", ["xw", "b"], ["xwb"]),
              node("Split", ["xwb"], ["q", "k", "v"], axis=-1, num_outputs=3)]
           + expand("prefix_k_const", "prefix_dims", "prefix_k") + expand("prefix_v_const", "prefix_dims", "prefix_v")
           + [node("Concat", ["prefix_k", "k"], ["k_all"], axis=1), node("Concat", ["prefix_v", "v"], ["v_all"], axis=1),
              node("MultiHeadAttention", ["q", "k_all", "v_all", "", "keys_mask"], ["y"], domain="com.microsoft",
                   num_heads=heads, mask_filter_value=MASK_FILL)],
           base + [const(flat(keys), "prefix_k_const"), const(flat(values), "prefix_v_const"),
                   i64("prefix_dims", [prefix, hidden])])

    # The text alone: what the prefix costs.
    yield ("Attention, no prefix", [node("Attention", ["x", "w", "b", "mask"], ["y"], domain="com.microsoft",
                                         num_heads=heads, mask_filter_value=MASK_FILL)], base[2:])


def session(nodes, constants, hidden: int, optimized: Path) -> ort.InferenceSession:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", hidden])
    mask = helper.make_tensor_value_info("mask", TensorProto.INT32, ["batch", "tokens"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", hidden])
    model = helper.make_model(helper.make_graph(nodes, "g", [x, mask], [y], constants),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    options = common.session_options()  # as the runtime runs a graph
    options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=common.UNFUSED)


def ops_run(optimized: Path) -> list:
    return [n.op_type for n in onnx.load(str(optimized)).graph.node]


def bundle_ops(bundle: Path) -> dict:
    """{graph file: {op type: count}} of what onnxruntime runs in the bundle's graphs after its optimizer."""
    out = {}
    for name in ("model.onnx", "model.int8.onnx"):
        if not (bundle / name).exists():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            options = common.session_options()
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            ort.InferenceSession(str(bundle / name), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=common.UNFUSED)
            out[name] = dict(sorted(collections.Counter(ops_run(Path(tmp) / "optimized.onnx")).items()))
    return out


@click.command()
@common.options()
@click.option("--repeats", default=50, show_default=True)
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="Also count the ops onnxruntime runs in this bundle's graphs.")
def main(backbone, data, smoke, results, repeats, bundle):
    bb = common.load_backbone(backbone)
    recipe = common.recipe()
    prefix = recipe.virtual_tokens
    tokens = round(roofline.mean_positions(bb, data, roofline.PromptShape()))  # the text alone
    hidden, heads = bb.config.hidden_size, bb.config.num_heads
    repeats = 2 if smoke else repeats
    rng = np.random.default_rng(0)
    lengths = rng.integers(max(1, tokens // 2), tokens + 1, BATCH)
    feed = {"x": rng.standard_normal((BATCH, tokens, hidden), dtype=np.float32),
            "mask": (np.arange(tokens)[None] < lengths[:, None]).astype(np.int32)}
    rows, outputs = [], {}
    for name, nodes, constants in variants(hidden, heads, prefix):
        with tempfile.TemporaryDirectory() as tmp:
            optimized = Path(tmp) / "optimized.onnx"
            s = session(nodes, constants, hidden, optimized)
            ran = ops_run(optimized)
        for _ in range(3):
            s.run(["y"], feed)
        seconds = []
        for _ in range(repeats):
            t = time.perf_counter()
            outputs[name] = s.run(["y"], feed)[0]
            seconds.append((time.perf_counter() - t) * 1000)
        ms = common.spread(seconds)
        rows.append({"kernel": name, "ops_run": ran, "ms": ms})
        click.echo(f"{name:<48} runs {'+'.join(ran):<60} median {ms['median']:.2f} ms "
                   f"(min {ms['min']:.2f}, max {ms['max']:.2f})")
    reference = outputs[rows[0]["kernel"]]
    real = lengths[:, None] > np.arange(tokens)[None]  # padded rows' outputs are not read
    for row in rows[1:3]:
        row["max_abs_diff"] = float(np.abs(outputs[row["kernel"]] - reference)[real].max())
        click.echo(f"{row['kernel']}: {row['ms']['median'] / rows[0]['ms']['median']:.2f}x the time of"
                   f" {rows[0]['kernel']} (max |difference| {row['max_abs_diff']:.1e})")
    click.echo(f"the prefix costs {rows[0]['ms']['median'] / rows[3]['ms']['median']:.2f}x {rows[3]['kernel']}")
    result = {"backbone": bb.name, "data": data, "batch": BATCH, "tokens": tokens, "prefix": prefix,
              "hidden": hidden, "heads": heads, "repeats": repeats, "smoke": smoke, "threads": common.cpu_threads(),
              "rows": rows, "onnxruntime": ort.__version__, "machine": common.machine_info()}
    if bundle:
        result["bundle"] = {"path": str(bundle), "layers": json.loads((Path(bundle) / "manifest.json").read_text())
                            ["backbone"]["layers"], "ops": bundle_ops(Path(bundle))}
        for name, counts in result["bundle"]["ops"].items():
            click.echo(f"{bundle}/{name} runs: " + ", ".join(f"{op} {n}" for op, n in counts.items()))
    common.write_results(results, "prefix_attention", result)


if __name__ == "__main__":
    main()
