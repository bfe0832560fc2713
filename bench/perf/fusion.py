"""onnxruntime's fused transformer kernels against the plain ops they replace, at batch-64 shapes.

    .venv/bin/python bench/perf/fusion.py [--backbone DIR] [--data mr] [--repeats 50] [--tokens 47]

Why model.onnx writes residual + LayerNorm and bias + GELU as separate ops
and runtime.onnx_backend turns off the passes that would fuse them: on this
CPU the fused kernels are slower.  Each row is a one-node (or few-node)
graph over [64, tokens, width] fp32 inputs (width: --backbone's hidden and
feed-forward sizes; tokens: --data's mean length plus the recipe's prompt,
MR on MiniLM 27 + 20), run --repeats times in one session; median, min and
max milliseconds per run (inputs and the output copied in and out, the same
for both sides of a pair).
Writes <results>/fusion.json.
"""

from __future__ import annotations

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


def session(nodes, width: int, tokens: int, params: dict, fuse: bool, optimized: Path) -> ort.InferenceSession:
    shape = [BATCH, tokens, width]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, "g", [value("x"), value("residual")], [value("y")],
                              [numpy_helper.from_array(v, k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    options = common.session_options()  # as the runtime runs a graph
    options.optimized_model_filepath = str(optimized)
    disabled = [] if fuse else common.UNFUSED
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
    return common.spread(seconds)


def pairs(hidden: int, intermediate: int):
    """(name, width, nodes, params, fuse) for the fused kernel and the plain ops."""
    rng = np.random.default_rng(1)
    vec = lambda n: rng.standard_normal(n).astype(np.float32)  # noqa: E731
    norm = {"gamma": vec(hidden), "beta": vec(hidden), "bias": vec(hidden)}
    node = helper.make_node
    residual_norm = [node("Add", ["x", "bias"], ["t"]), node("Add", ["t", "residual"], ["u"]),
                     node("LayerNormalization", ["u", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    yield "SkipLayerNormalization (fused)", hidden, residual_norm, norm, True
    yield "Add, Add, LayerNormalization", hidden, residual_norm, norm, False
    bias_gelu = [node("Add", ["x", "bias"], ["t"]), node("Gelu", ["t"], ["y"])]
    yield "BiasGelu (fused)", intermediate, bias_gelu, {"bias": vec(intermediate)}, True
    yield "Add, Gelu", intermediate, bias_gelu, {"bias": vec(intermediate)}, False


@click.command()
@common.options()
@click.option("--repeats", default=50, show_default=True)
@click.option("--tokens", default=None, type=int,
              help="Positions per row [default: --data's mean length + the states the recipe's prompt adds].")
def main(backbone, data, smoke, results, repeats, tokens):
    bb = common.load_backbone(backbone)
    tokens = tokens or round(roofline.mean_positions(bb, data, roofline.PromptShape.of_recipe(common.recipe())))
    repeats = 2 if smoke else repeats
    rows = []
    for name, width, nodes, params, fuse in pairs(bb.config.hidden_size, bb.config.intermediate_size):
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
    common.write_results(results, "fusion", {"backbone": bb.name, "data": data, "tokens": tokens, "repeats": repeats,
                                             "smoke": smoke, "threads": common.cpu_threads(), "rows": rows,
                                             "onnxruntime": ort.__version__, "machine": common.machine_info()})


if __name__ == "__main__":
    main()
