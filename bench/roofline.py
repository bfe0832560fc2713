"""The limit: fp32 GEMM speed at the model's shapes, and the model's FLOPs per sentence.

    .venv/bin/python bench/roofline.py [--tokens 3072] [--repeats 20] [--libraries numpy,mindspore,onnxruntime]

A MiniLM forward pass is almost all matrix products: per layer and token,
the fused query/key/value projection, the attention output projection and
the two feed-forward projections are 1.77 MFLOP, the attention scores and
context 4 * seq * hidden more (about 4% at MR lengths).  So the speed a
library multiplies [M, K] x [K, N] fp32 matrices at those shapes, measured
here in the same run, bounds what any runtime can reach on this machine.

For each library and each of the four GEMM shapes of a layer (M = batch *
seq tokens, default 64 * 48, a batch-64 MR pass): GFLOP/s over --repeats
timed calls (min/median/max, after warm-up calls).

"The limit" (`limit_gflops`) is one number: for each library, the rate a
layer's four GEMMs reach together at their median times (total FLOPs / total
seconds, i.e. each shape weighted by its share of the model's FLOPs, the
feed-forward pair being two thirds), and then the best library.  Throughput
elsewhere is expressed as useful FLOPs per second over this limit.

Libraries, each with all the cores this process may use:
- numpy: its bundled OpenBLAS, `a @ b`;
- mindspore: `ops.matmul` in a GRAPH-mode Cell (how the builder and the
  MindIR backend run; PYNATIVE measured about half the rate); calls are
  queued back to back and synchronised once per timed batch of calls, so
  the copy of the result to numpy is counted once per batch, not per call;
- onnxruntime: a one-node MatMul graph (MLAS, the GEMM the bundle runs on),
  weights as an initializer as in the bundle.
Writes bench/results/roofline.json.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from common import cpu_threads, spread


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs; builder.model.EncoderConfig has the same attribute names."""

    hidden_size: int = 384
    intermediate_size: int = 1536
    num_layers: int = 6
    num_heads: int = 12
    num_labels: int = 2


MINILM = ModelShape()  # all-MiniLM-L6-v2


# --- FLOPs ----------------------------------------------------------------------

def layer_gemm_shapes(tokens: int, cfg=MINILM) -> list:
    """(name, M, K, N) of the four weight GEMMs of one layer over `tokens` rows."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return [("qkv", tokens, h, 3 * h),  # builder/model.py fuses query, key and value into one Dense
            ("attn_out", tokens, h, h),
            ("ffn_up", tokens, h, i),
            ("ffn_down", tokens, i, h)]


def flops_per_sequence(seq_len: int, virtual_tokens: int, cfg=MINILM) -> int:
    """Matmul FLOPs (2*M*N*K) of one forward pass over one sequence.

    seq_len: text tokens ([CLS] and [SEP] included); the encoder runs over
    seq_len + virtual_tokens positions.  Counted: the four linears of every
    layer, attention scores (Q K^T) and context (P V) over all heads, and
    the classification head.  Not counted: embeddings (a gather), layer norms,
    softmax, GELU, pooling (element-wise, a few % of the time, no GEMM).
    """
    s = seq_len + virtual_tokens
    h = cfg.hidden_size
    linears = sum(2 * m * k * n for _, m, k, n in layer_gemm_shapes(s, cfg))
    attention = 2 * (2 * s * s * h)  # scores [s, d] x [d, s] and context [s, s] x [s, d], summed over heads
    head = 2 * h * getattr(cfg, "num_labels", 2)
    return cfg.num_layers * (linears + attention) + head


def flops_of_lengths(lengths, virtual_tokens: int, cfg=MINILM) -> int:
    """Useful FLOPs of a set of sentences, each at its own length (no padding)."""
    return sum(flops_per_sequence(n, virtual_tokens, cfg) for n in lengths)


def flops_of_batch(batch_size: int, padded_len: int, virtual_tokens: int, cfg=MINILM) -> int:
    """FLOPs actually executed for one padded batch (every row at the padded length)."""
    return batch_size * flops_per_sequence(padded_len, virtual_tokens, cfg)


# --- GEMM timing ----------------------------------------------------------------

def time_calls(call, sync, repeats: int, min_seconds: float = 0.05) -> list:
    """Seconds per call, `repeats` samples; each sample averages enough calls to last min_seconds."""
    sync(call())  # warm-up: first-call allocation, thread pool start
    t = time.perf_counter()
    sync(call())
    per_call = max(time.perf_counter() - t, 1e-6)
    inner = max(1, int(min_seconds / per_call))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner - 1):
            call()
        sync(call())
        samples.append((time.perf_counter() - t) / inner)
    return samples


def numpy_gemm(m: int, k: int, n: int, repeats: int) -> list:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), np.float32)
    return time_calls(lambda: np.matmul(a, b, out=out), lambda _: None, repeats)


def mindspore_gemm(m: int, k: int, n: int, repeats: int) -> list:
    import mindspore as ms
    from mindspore import nn, ops

    class MatMul(nn.Cell):
        def construct(self, a, b):
            return ops.matmul(a, b)

    # GRAPH mode, as the builder and the MindIR backend run: measured 2x the
    # GEMM rate of PYNATIVE at these shapes on this machine.
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    rng = np.random.default_rng(0)
    a = ms.Tensor(rng.standard_normal((m, k), dtype=np.float32))
    b = ms.Tensor(rng.standard_normal((k, n), dtype=np.float32))
    cell = MatMul()
    # Calls may be queued: .asnumpy() on the last result of a timed batch waits for all of them.
    return time_calls(lambda: cell(a, b), lambda r: r.asnumpy(), repeats)


def onnxruntime_gemm(m: int, k: int, n: int, repeats: int) -> list:
    import onnx  # the builder's dependency; present in the project venv
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()  # as runtime/onnx_backend.py sets them
    options.intra_op_num_threads = cpu_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": rng.standard_normal((m, k), dtype=np.float32)}
    return time_calls(lambda: session.run(None, feed), lambda _: None, repeats)


LIBRARIES = {"numpy": numpy_gemm, "mindspore": mindspore_gemm, "onnxruntime": onnxruntime_gemm}


def library_versions(libraries) -> dict:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    versions = {"numpy": np.__version__, "numpy_blas": f"{blas.get('name')} {blas.get('version')}"}
    if "mindspore" in libraries:
        import mindspore

        versions["mindspore"] = mindspore.__version__
        versions["mindspore_runtime_num_threads"] = mindspore.get_context("runtime_num_threads")
    if "onnxruntime" in libraries:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return versions


def measure_library(name: str, tokens: int, repeats: int, cfg=MINILM) -> dict:
    """GFLOP/s of one library at the four layer shapes, and its combined layer rate."""
    shapes, total_flops, total_seconds = {}, 0, 0.0
    for shape, m, k, n in layer_gemm_shapes(tokens, cfg):
        flops = 2 * m * k * n
        seconds = LIBRARIES[name](m, k, n, repeats)
        shapes[shape] = {"m": m, "k": k, "n": n, "gflops": spread([flops / s / 1e9 for s in seconds], 1),
                         "ms_per_call": spread([s * 1e3 for s in seconds], 3)}
        total_flops += flops
        total_seconds += statistics.median(seconds)
    return {"shapes": shapes, "layer_gflops": round(total_flops / total_seconds / 1e9, 1)}


def measure(tokens: int = 64 * 48, repeats: int = 20, libraries=("numpy", "mindspore", "onnxruntime"),
            cfg=MINILM) -> dict:
    """The roofline result: per-library rates and `limit_gflops`, the best layer rate."""
    if "mindspore" in libraries and "onnxruntime" in libraries:
        import mindspore  # noqa: F401  before onnx: both bundle protobuf, MindSpore's must load first
    results = {name: measure_library(name, tokens, repeats, cfg) for name in libraries}
    best = max(results, key=lambda name: results[name]["layer_gflops"])
    return {"tokens": tokens, "repeats": repeats, "threads": cpu_threads(), "model": cfg.__dict__,
            "libraries": results, "versions": library_versions(libraries),
            "limit_gflops": results[best]["layer_gflops"], "limit_library": best,
            "limit_definition": "max over libraries of (FLOPs of one layer's 4 GEMMs) / "
                                "(sum of their median times) at M = tokens"}


def fraction_of_limit(gflops: float, limit_gflops: float) -> float:
    return round(gflops / limit_gflops, 3)


def table(result: dict) -> str:
    names = [s for s, *_ in layer_gemm_shapes(result["tokens"])]
    lines = [f"GEMM GFLOP/s, fp32, M = {result['tokens']} tokens, {result['threads']} threads "
             f"(median [min-max] of {result['repeats']})",
             f"{'library':<12}" + "".join(f"{n:>22}" for n in names) + f"{'layer':>9}"]
    for lib, r in result["libraries"].items():
        cells = "".join(f"{r['shapes'][n]['gflops']['median']:>9.1f} [{r['shapes'][n]['gflops']['min']:.0f}-"
                        f"{r['shapes'][n]['gflops']['max']:.0f}]".rjust(22) for n in names)
        lines.append(f"{lib:<12}{cells}{r['layer_gflops']:>9.1f}")
    lines.append(f"limit: {result['limit_gflops']:.1f} GFLOP/s ({result['limit_library']}); "
                 f"MiniLM + 20 virtual tokens, 25-token sentence: "
                 f"{flops_per_sequence(25, 20) / 1e9:.2f} GFLOP")
    return "\n".join(lines)


@click.command()
@click.option("--tokens", default=64 * 48, show_default=True, help="M: batch * padded sequence length.")
@click.option("--repeats", default=20, show_default=True)
@click.option("--libraries", default=",".join(LIBRARIES), show_default=True)
@click.option("--out", default="bench/results/roofline.json", show_default=True)
def main(tokens, repeats, libraries, out):
    result = measure(tokens, repeats, tuple(x.strip() for x in libraries.split(",") if x.strip()))
    click.echo(table(result))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"-> {out}")


if __name__ == "__main__":
    main()
