"""onnxruntime's fused transformer kernels against the plain ops they replace, at MR's batch-64 shapes.

    .venv/bin/python bench/fusion.py [--repeats 50] [--tokens 47]

Why model.onnx writes residual + LayerNorm and bias + GELU as separate ops
and runtime.onnx_backend turns off the passes that would fuse them: on this
CPU the fused kernels are slower.  Each row is a one-node (or few-node)
graph over [64, tokens, width] fp32 inputs, run --repeats times in one
session; median, min and max milliseconds per run (inputs and the output
copied in and out, the same for both sides of a pair).
Writes bench/results/fusion.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from common import cpu_threads, machine_info, spread
from ptbundle.runtime.onnx_backend import UNFUSED

HIDDEN, INTERMEDIATE, BATCH = 384, 1536, 64  # all-MiniLM-L6-v2, the bench's batch


def session(nodes, width: int, tokens: int, params: dict, fuse: bool, optimized: Path) -> ort.InferenceSession:
    shape = [BATCH, tokens, width]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, "g", [value("x"), value("residual")], [value("y")],
                              [numpy_helper.from_array(v, k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.inter_op_num_threads = 1
    options.optimized_model_filepath = str(optimized)
    disabled = [] if fuse else UNFUSED
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


def time_session(s: ort.InferenceSession, width: int, tokens: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    feed = {name: rng.standard_normal((BATCH, tokens, width), dtype=np.float32) for name in ("x", "residual")}
    feed = {i.name: feed[i.name] for i in s.get_inputs()}
    for _ in range(3):
        s.run(None, feed)
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, feed)
        seconds.append((time.perf_counter() - t) * 1000)
    return spread(seconds)


def pairs(tokens: int):
    """(name, width, nodes, params, fuse) for the fused kernel and the plain ops."""
    rng = np.random.default_rng(1)
    vec = lambda n: rng.standard_normal(n).astype(np.float32)
    norm = {"gamma": vec(HIDDEN), "beta": vec(HIDDEN), "bias": vec(HIDDEN)}
    node = helper.make_node
    residual_norm = [node("Add", ["x", "bias"], ["t"]), node("Add", ["t", "residual"], ["u"]),
                     node("LayerNormalization", ["u", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    yield "SkipLayerNormalization (fused)", HIDDEN, residual_norm, norm, True
    yield "Add, Add, LayerNormalization", HIDDEN, residual_norm, norm, False
    bias_gelu = [node("Add", ["x", "bias"], ["t"]), node("Gelu", ["t"], ["y"])]
    yield "BiasGelu (fused)", INTERMEDIATE, bias_gelu, {"bias": vec(INTERMEDIATE)}, True
    yield "Add, Gelu", INTERMEDIATE, bias_gelu, {"bias": vec(INTERMEDIATE)}, False


@click.command()
@click.option("--repeats", default=50, show_default=True)
@click.option("--tokens", default=47, show_default=True, help="Positions per row: MR's mean 27 + 20 virtual tokens.")
@click.option("--out", default="bench/results/fusion.json", show_default=True)
def main(repeats, tokens, out):
    rows = []
    for name, width, nodes, params, fuse in pairs(tokens):
        with tempfile.TemporaryDirectory() as tmp:
            optimized = Path(tmp) / "optimized.onnx"
            s = session(nodes, width, tokens, params, fuse, optimized)
            ran = [n.op_type for n in onnx.load(str(optimized)).graph.node]  # what onnxruntime really runs
        ms = time_session(s, width, tokens, repeats)
        rows.append({"kernel": name, "ops_run": ran, "shape": [BATCH, tokens, width], "ms": ms})
        click.echo(f"{name:<32} runs {'+'.join(ran):<32} median {ms['median']:.2f} ms "
                   f"(min {ms['min']:.2f}, max {ms['max']:.2f})")
    for fused, plain in ((rows[0], rows[1]), (rows[2], rows[3])):
        click.echo(f"{fused['kernel']}: {fused['ms']['median'] / plain['ms']['median']:.2f}x the time of {plain['kernel']}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"repeats": repeats, "threads": cpu_threads(), "rows": rows,
                                     "onnxruntime": ort.__version__, "machine": machine_info()}, indent=2) + "\n")
    click.echo(f"-> {out}")


if __name__ == "__main__":
    main()
