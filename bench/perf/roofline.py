"""The limit: fp32 GEMM speed at the model's shapes, and the model's FLOPs per sentence.

    .venv/bin/python bench/perf/roofline.py [--backbone DIR] [--data mr] [--bundle B] [--repeats 20] [--libraries numpy,mindspore,onnxruntime]

An encoder's forward pass is almost all matrix products: per layer and
token, the fused query/key/value projection, the attention output
projection and the two feed-forward projections (MiniLM: 1.77 MFLOP), the
attention scores and context 4 * seq * hidden more (about 4% at MR
lengths).  So the speed a library multiplies [M, K] x [K, N] fp32 matrices
at those shapes, measured here in the same run, bounds what any runtime can
reach on this machine.

For each library and each of the four GEMM shapes of a layer of --backbone
(M = tokens: 64 rows of --data's mean length plus the states a prompt puts
before the text, --bundle's or the default recipe's, rounded up to 8; MR on
MiniLM with 20 virtual tokens: 64 * 48): GFLOP/s over --repeats timed calls
(min/median/max, after warm-up calls).

"The limit" (`limit_gflops`) is one number: for each library, the rate a
layer's four GEMMs reach together at their median times (total FLOPs / total
seconds, i.e. each shape weighted by its share of the model's FLOPs, the
feed-forward pair being two thirds), and then the best library.  Throughput
elsewhere is expressed as useful FLOPs per second over this limit.

Libraries, each with all the cores this process may use:
- numpy: its bundled OpenBLAS, `a @ b`;
- mindspore: `ops.matmul` in a GRAPH-mode Cell (how the builder and the
  MindIR backend run; PYNATIVE measured about half the rate); calls are
  queued back to back and synchronised once per timed batch of calls;
- onnxruntime: a one-node MatMul graph (MLAS, the GEMM the bundle runs on),
  weights as an initializer as in the bundle.
Writes <results>/roofline.json.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs (builder.model.EncoderConfig's attribute names)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_labels: int = 2

    @classmethod
    def of_backbone(cls, backbone, num_labels: int = 2) -> "ModelShape":
        c = backbone.config
        return cls(c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, num_labels)

    @classmethod
    def of_manifest(cls, manifest: dict) -> "ModelShape":
        b = manifest["backbone"]
        return cls(b["hidden_size"], b["intermediate_size"], b["layers"], b["heads"], len(manifest["labels"]))


# --- FLOPs ----------------------------------------------------------------------

@dataclass(frozen=True)
class PromptShape:
    """Where a prompt method (builder/prompts.py) adds work to the encoder.

    prompt-tuning: P states before the text, in every layer; prefix-tuning: P
    constant keys and values in front of each layer's own from `layer` on (no
    extra query rows, nothing projected); late-prompt: P states entering layer
    `layer`, in every layer from there; none: the text alone.
    """

    method: str = "none"
    virtual_tokens: int = 0
    layer: int = 0

    @classmethod
    def of_manifest(cls, manifest: dict) -> "PromptShape":
        """A bundle's (common.read_manifest's dict; bundles before prefix tuning have no recipe layer: 0)."""
        return cls(manifest["prompt_method"], manifest["num_virtual_tokens"], (manifest.get("recipe") or {}).get("layer", 0))

    @classmethod
    def of_recipe(cls, recipe) -> "PromptShape":
        return cls(recipe.method if recipe.virtual_tokens else "none", recipe.virtual_tokens, recipe.layer)

    def rows_and_keys(self, layer: int, seq_len: int) -> tuple:
        """(query rows, keys each row attends to) of a `seq_len`-token text at encoder layer `layer`."""
        p = self.virtual_tokens if layer >= self.layer else 0
        if self.method in ("prompt-tuning", "late-prompt"):
            return seq_len + p, seq_len + p
        if self.method == "prefix-tuning":
            return seq_len, seq_len + p
        if self.method == "none":
            return seq_len, seq_len
        raise ValueError(f"prompt method {self.method!r}: no FLOP count for it")

    @property
    def top_rows(self) -> int:
        """States in front of the text in the last layer (what the GEMMs there run on besides the text)."""
        return self.virtual_tokens if self.method in ("prompt-tuning", "late-prompt") else 0


def flops_per_sequence(seq_len: int, prompt: PromptShape, cfg: ModelShape) -> int:
    """Matmul FLOPs (2*M*N*K) of one forward pass over one sequence.

    seq_len: text tokens ([CLS] and [SEP] included); each layer runs its
    linears over its query rows and attends them to its keys
    (PromptShape.rows_and_keys).  Counted: the four linears of every layer,
    attention scores (Q K^T) and context (P V) over all heads, and the
    classification head.  Not counted: embeddings (a gather), layer norms,
    softmax, GELU, pooling (element-wise, a few % of the time, no GEMM).
    """
    h, total = cfg.hidden_size, 2 * cfg.hidden_size * cfg.num_labels
    for layer in range(cfg.num_layers):
        rows, keys = prompt.rows_and_keys(layer, seq_len)
        linears = sum(2 * m * k * n for _, m, k, n in common.layer_gemm_shapes(rows, h, cfg.intermediate_size))
        total += linears + 2 * (2 * rows * keys * h)  # scores [rows, d] x [d, keys] and context, summed over heads
    return total


def flops_of_lengths(lengths, prompt: PromptShape, cfg: ModelShape) -> int:
    """Useful FLOPs of a set of sentences, each at its own length (no padding)."""
    return sum(flops_per_sequence(n, prompt, cfg) for n in lengths)


def flops_of_batch(batch_size: int, padded_len: int, prompt: PromptShape, cfg: ModelShape) -> int:
    """FLOPs actually executed for one padded batch (every row at the padded length)."""
    return batch_size * flops_per_sequence(padded_len, prompt, cfg)


def mean_positions(backbone, data: str, prompt: PromptShape) -> float:
    """Mean positions per sentence of --data's test (or dev) split in the last layer: text tokens plus the
    states a prompt puts in front of them."""
    examples = common.eval_split(common.load_data(data))[1]
    tokenizer = common.load_tokenizer(backbone.tokenizer_path, common.recipe().max_length)
    lengths = [len(e.ids) for e in common.encode(tokenizer, *common.split_texts(examples))]
    return float(np.mean(lengths)) + prompt.top_rows


# --- GEMM timing ----------------------------------------------------------------

def numpy_gemm(m: int, k: int, n: int, repeats: int, min_seconds: float) -> list:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), np.float32)
    return common.time_calls(lambda: np.matmul(a, b, out=out), lambda _: None, repeats, min_seconds)


def mindspore_gemm(m: int, k: int, n: int, repeats: int, min_seconds: float) -> list:
    import mindspore as ms
    from mindspore import nn, ops

    class MatMul(nn.Cell):
        def construct(self, a, b):
            return ops.matmul(a, b)

    common.use_device("CPU")  # GRAPH mode, as the builder and the MindIR backend run (2x PYNATIVE's rate here)
    rng = np.random.default_rng(0)
    a = ms.Tensor(rng.standard_normal((m, k), dtype=np.float32))
    b = ms.Tensor(rng.standard_normal((k, n), dtype=np.float32))
    cell = MatMul()
    return common.time_calls(lambda: cell(a, b), lambda r: r.asnumpy(), repeats, min_seconds)


def onnxruntime_gemm(m: int, k: int, n: int, repeats: int, min_seconds: float) -> list:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = common.session_options()  # as the runtime runs a graph
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": rng.standard_normal((m, k), dtype=np.float32)}
    return common.time_calls(lambda: session.run(None, feed), lambda _: None, repeats, min_seconds)


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


def measure_library(name: str, tokens: int, repeats: int, cfg: ModelShape, min_seconds: float) -> dict:
    """GFLOP/s of one library at the four layer shapes, and its combined layer rate."""
    shapes, total_flops, total_seconds = {}, 0, 0.0
    for shape, m, k, n in common.layer_gemm_shapes(tokens, cfg.hidden_size, cfg.intermediate_size):
        flops = 2 * m * k * n
        seconds = LIBRARIES[name](m, k, n, repeats, min_seconds)
        shapes[shape] = {"m": m, "k": k, "n": n, "gflops": common.spread([flops / s / 1e9 for s in seconds], 1),
                         "ms_per_call": common.spread([s * 1e3 for s in seconds], 3)}
        total_flops += flops
        total_seconds += statistics.median(seconds)
    return {"shapes": shapes, "layer_gflops": round(total_flops / total_seconds / 1e9, 1)}


def measure(cfg: ModelShape, tokens: int, repeats: int = 20, libraries=tuple(LIBRARIES),
            min_seconds: float = 0.05) -> dict:
    """The roofline result: per-library rates and `limit_gflops`, the best layer rate."""
    if "mindspore" in libraries:
        import mindspore  # noqa: F401  before onnx: both bundle protobuf, MindSpore's must load first
    results = {name: measure_library(name, tokens, repeats, cfg, min_seconds) for name in libraries}
    best = max(results, key=lambda name: results[name]["layer_gflops"])
    return {"tokens": tokens, "repeats": repeats, "threads": common.cpu_threads(), "model": cfg.__dict__,
            "libraries": results, "versions": library_versions(libraries),
            "limit_gflops": results[best]["layer_gflops"], "limit_library": best,
            "limit_definition": "max over libraries of (FLOPs of one layer's 4 GEMMs) / "
                                "(sum of their median times) at M = tokens"}


def table(result: dict, prompt: PromptShape, positions: float) -> str:
    cfg = ModelShape(**result["model"])
    names = [s for s, *_ in common.layer_gemm_shapes(result["tokens"], cfg.hidden_size, cfg.intermediate_size)]
    lines = [f"GEMM GFLOP/s, fp32, M = {result['tokens']} tokens, {result['threads']} threads "
             f"(median [min-max] of {result['repeats']})",
             f"{'library':<12}" + "".join(f"{n:>22}" for n in names) + f"{'layer':>9}"]
    for lib, r in result["libraries"].items():
        cells = "".join(f"{r['shapes'][n]['gflops']['median']:>9.1f} [{r['shapes'][n]['gflops']['min']:.0f}-"
                        f"{r['shapes'][n]['gflops']['max']:.0f}]".rjust(22) for n in names)
        lines.append(f"{lib:<12}{cells}{r['layer_gflops']:>9.1f}")
    text = round(positions) - prompt.top_rows
    lines.append(f"limit: {result['limit_gflops']:.1f} GFLOP/s ({result['limit_library']}); "
                 f"{prompt.method}, {prompt.virtual_tokens} virtual tokens + a {text}-token sentence: "
                 f"{flops_per_sequence(text, prompt, cfg) / 1e9:.3f} GFLOP")
    return "\n".join(lines)


@click.command()
@common.options()
@click.option("--tokens", default=None, type=int, help="M: batch * positions [default: 64 rows of --data's mean].")
@click.option("--bundle", "bundle_path", default=None, help="Count the prompt of this bundle [default: the recipe's].")
@click.option("--virtual-tokens", default=None, type=int, help="Prompt length [default: the recipe's or --bundle's].")
@click.option("--repeats", default=20, show_default=True)
@click.option("--libraries", default=",".join(LIBRARIES), show_default=True)
def main(backbone, data, smoke, results, tokens, bundle_path, virtual_tokens, repeats, libraries):
    bb = common.load_backbone(backbone)
    prompt = PromptShape.of_manifest(common.read_manifest(bundle_path)) if bundle_path \
        else PromptShape.of_recipe(common.recipe())
    if virtual_tokens is not None:
        prompt = PromptShape(prompt.method, virtual_tokens, prompt.layer)
    positions = mean_positions(bb, data, prompt)
    tokens = tokens or 64 * (-(-round(positions) // 8) * 8)
    repeats, min_seconds = (1, 0.005) if smoke else (repeats, 0.05)
    result = measure(ModelShape.of_backbone(bb), tokens, repeats,
                     tuple(x.strip() for x in libraries.split(",") if x.strip()), min_seconds)
    result.update(backbone=bb.name, data=data, prompt=prompt.__dict__, mean_positions=round(positions, 1), smoke=smoke)
    click.echo(table(result, prompt, positions))
    common.write_results(results, "roofline", result)


if __name__ == "__main__":
    main()
