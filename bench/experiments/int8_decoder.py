"""Which int8 graph a generation bundle gets: agreement with its fp32 graph, and decode speed, per candidate.

    .venv/bin/python bench/experiments/int8_decoder.py --bundle DIR     # DIR: a generation bundle (decoder.onnx)
    .venv/bin/python bench/experiments/int8_decoder.py --smoke          # the tiny test Llama, under a minute

Every candidate is made from the bundle's decoder.onnx; the LM head (a Gemm
over the tied embedding table) stays fp32 unless the name says "head".

    dynamic          what pt-build wrote before this choice: onnxruntime's
                     dynamic quantization, int8 weights per column (7-bit), one activation scale per call
    dynamic-no-down  the same with each layer's down_proj fp32 (SwiGLU's output carries Llama's outliers)
    nbits8-b32       MatMulNBits (builder.quantize.blockwise_weights): 8-bit weights in blocks of 32 along the
                     input axis, each with its scale, accuracy_level 4 (activations quantized to int8 per block of 32 at run time, as llama.cpp's
                     Q8_0 x Q8_0 dot products do): an outlier spoils only its own block's scale
    nbits8-b32-head  the same with the LM head too (a transposed int8 copy of the table; the Gather keeps fp32):
                     what pt-build writes (builder.generation.quantize_decoder)
    nbits8-b128      blocks of 128
    nbits4-b32       4-bit weights, blocks of 32 (for scale: llama.cpp's Q4 class)

For each: teacher-forced agreement with fp32 over --prompts prompts (the fp32
graph's own greedy tokens fed to both, --new-tokens steps each: the share of
steps whose argmax equals fp32's, and the largest |logit difference| relative
to the largest fp32 logit), free-running greedy sequences equal to fp32's,
decode tokens/s (median [min-max] over prompts, the teacher-forced loop's
steps after the first), time to first token, and file size.  Decoding is
memory-bound at batch 1: bytes of weights read per token decide the speed.
Writes <results>/int8_decoder.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common and perf/
import common  # noqa: E402

common.decoder_graph  # noqa: B018  (imports MindSpore before onnx: see builder/onnx_export.py)
import onnx  # noqa: E402

from perf.generate_speed import PROMPTS, tiny_llama  # noqa: E402

CANDIDATES = ("fp32", "dynamic", "dynamic-no-down", "nbits8-b32", "nbits8-b32-head", "nbits8-b128", "nbits4-b32")
LM_HEAD = "lm_head"  # builder.decoder_onnx.LM_HEAD_NODE


def build(name: str, fp32: Path, out: Path) -> Path:
    if name == "fp32":
        return fp32
    path = out / f"{name}.onnx"
    if name == "nbits8-b32-head":  # what pt-build writes: the product's own function
        common.quantize_decoder(fp32, path)
    elif name.startswith("nbits"):
        bits, block = int(name[5]), int(name.split("-b")[1])
        common.blockwise_weights(fp32, path, bits=bits, block_size=block, exclude=(LM_HEAD,))
    else:  # onnxruntime renames the head's Gemm "<name>_MatMul" before it applies the exclusion
        exclude = [LM_HEAD, LM_HEAD + "_MatMul"]
        if name == "dynamic-no-down":
            exclude += [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node
                        if n.name.endswith("down_proj")]
        common.quantize_weights(fp32, path, exclude=tuple(exclude))
    return path


def teacher_forced(session, ids: list, tokens: list) -> dict:
    """Feed `ids` then `tokens` (fp32's greedy continuation) step by step: each step's logits and times."""
    p = session.prompt_length
    start = time.perf_counter()
    logits, cache = session.prefill(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64))
    first = time.perf_counter()
    steps = [logits[0]]
    for k, token in enumerate(tokens[:-1]):
        position = p + len(ids) + k
        logits, cache = session.run(np.array([[token]], np.int64), np.array([[position]], np.int64),
                                    np.ones((1, position + 1), np.int64), cache)
        steps.append(logits[0])
    end = time.perf_counter()
    return {"logits": np.stack(steps), "ttft": first - start,
            "decode_tokens_per_s": (len(tokens) - 1) / (end - first) if len(tokens) > 1 else None}


def greedy(session, ids: list, n: int) -> list:
    p = session.prompt_length
    logits, cache = session.prefill(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64))
    tokens = [int(np.argmax(logits[0]))]
    for k in range(n - 1):
        position = p + len(ids) + k
        logits, cache = session.run(np.array([[tokens[-1]]], np.int64), np.array([[position]], np.int64),
                                    np.ones((1, position + 1), np.int64), cache)
        tokens.append(int(np.argmax(logits[0])))
    return tokens


@click.command()
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="A generation bundle (pt-build instruct, or bench/perf/generate_speed.py --bundles DIR's DIR/prompt).")
@click.option("--prompts", "n_prompts", type=int, default=20, show_default=True)
@click.option("--new-tokens", type=int, default=32, show_default=True)
@click.option("--candidates", default=",".join(CANDIDATES), show_default=True)
@click.option("--smoke", is_flag=True, help="The tiny test Llama (a bundle built here), 2 prompts, 8 tokens.")
@click.option("--results", type=click.Path(file_okay=False), default=str(common.RESULTS), show_default="bench/results")
def main(bundle, n_prompts, new_tokens, candidates, smoke, results):
    from safetensors.numpy import load_file

    started = time.perf_counter()
    names = [c for c in candidates.split(",") if c]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        raise click.BadParameter(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}", param_hint="--candidates")
    with tempfile.TemporaryDirectory(prefix="int8-decoder-") as tmp:
        tmp = Path(tmp)
        if smoke:
            n_prompts, new_tokens = 2, 8
            bundle = bundle or str(smoke_bundle(tmp))
        if bundle is None:
            raise click.UsageError("--bundle DIR (a generation bundle) or --smoke")
        bundle = Path(bundle)
        opened = common.open_bundle(bundle)
        generator = opened.generator
        if generator is None:
            raise click.UsageError(f"{bundle}: not a generation bundle")
        texts = PROMPTS if not smoke else [p[:40] for p in PROMPTS]
        ids = [generator.encode(t) for t in texts[:n_prompts]]
        cache = load_file(str(bundle / "prompt_cache.safetensors"))
        fp32 = bundle / "decoder.onnx"
        reference = common.DecoderSession(fp32, cache)
        wanted = [greedy(reference, x, new_tokens) for x in ids]
        rows = {}
        for name in names:
            t = time.perf_counter()
            path = build(name, fp32, tmp)
            built = time.perf_counter() - t
            session = common.DecoderSession(path, cache)
            forced = [teacher_forced(session, x, w) for x, w in zip(ids, wanted)]
            base = [teacher_forced(reference, x, w)["logits"] for x, w in zip(ids, wanted)] if name != "fp32" else \
                [f["logits"] for f in forced]
            agree = [float(np.mean(np.argmax(f["logits"], 1) == np.array(w))) for f, w in zip(forced, wanted)]
            rel = [float(np.abs(f["logits"] - b).max() / max(1.0, np.abs(b).max())) for f, b in zip(forced, base)]
            same = sum(greedy(session, x, new_tokens) == w for x, w in zip(ids, wanted))
            rows[name] = {
                "size_mb": round(path.stat().st_size / 2**20, 1), "build_s": round(built, 1),
                "teacher_forced_top1_agreement": round(float(np.mean(agree)), 4),
                "max_rel_logit_diff": common.spread(rel, 4), "greedy_equal": f"{same}/{len(ids)}",
                "decode_tokens_per_s": common.spread([f["decode_tokens_per_s"] for f in forced], 1),
                "ttft_ms": common.spread([1000 * f["ttft"] for f in forced], 1),
                "ops": dict(sorted({op: sum(n.op_type == op for n in onnx.load(str(path), load_external_data=False)
                                            .graph.node) for op in ("MatMul", "MatMulInteger", "MatMulNBits",
                                                                    "Gemm")}.items()))}
            common.log(f"{name}: {json.dumps(rows[name])}")
    result = {"bundle": str(bundle), "machine": common.machine_info(), "prompts": n_prompts,
              "prompt_tokens": [len(x) for x in ids], "new_tokens": new_tokens,
              "onnxruntime": __import__("onnxruntime").__version__, "onnxruntime_threads": common.cpu_threads(),
              "candidates": rows, "seconds": round(time.perf_counter() - started, 1)}
    print(f"\n{bundle}: {n_prompts} prompts, {new_tokens} tokens each (agreement: teacher-forced on fp32's greedy"
          f" tokens)")
    header = f"{'candidate':16} | {'MB':>6} | {'top-1 agree':>11} | {'greedy =':>8} | {'max rel diff (median)':>21} |" \
             f" {'decode tok/s':>20} | {'TTFT ms':>18}"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        d, t = r["decode_tokens_per_s"], r["ttft_ms"]
        print(f"{name:16} | {r['size_mb']:6.1f} | {r['teacher_forced_top1_agreement']:11.4f} | {r['greedy_equal']:>8} |"
              f" {r['max_rel_logit_diff']['max']:10.4f} ({r['max_rel_logit_diff']['median']:.4f}) |"
              f" {d['median']:6.1f} [{d['min']:.1f}-{d['max']:.1f}] | {t['median']:6.1f} [{t['min']:.1f}-{t['max']:.1f}]")
    common.write_results(results, "int8_decoder" + ("-smoke" if smoke else ""), result)


def smoke_bundle(tmp: Path) -> Path:
    """A generation bundle of the tiny test Llama with no prompt, written by the product's writer."""
    backbone = common.load_backbone(str(tiny_llama(tmp / "tiny-llama")))
    out = tmp / "bundle"
    common.write_generation_bundle(out, backbone.weights, backbone.config, backbone.tokenizer_path, None,
                                   name="tiny", template=None, details={}, backbone=common.backbone_info(backbone))
    return out


if __name__ == "__main__":
    main()
