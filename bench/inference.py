"""Inference speed of a bundle: throughput on MR test and cold start of pt-run.

    .venv/bin/python bench/inference.py [--bundle exports/mr-soft] [--batch-sizes 1,8,64] [--repeats 5]

For each backend (onnxruntime fp32, onnxruntime int8 when the bundle has it,
MindSpore fp32):
- throughput: sentences/s at each batch size, with the runtime's
  sorted-length batching (`Bundle.predict`) and without it
  (`sort_by_length=False`: consecutive batches in input order); min/median/max of
  --repeats passes over the sentences, after a warm-up pass over two batches.
  Batch 1 has one row per batch, so sorting changes nothing: measured once.
  Batch 8 and 64 use MR test (1,068 sentences; --every K takes every K-th),
  batch 1 every --every-batch1-th (all of MR test at batch 1 takes minutes on
  MindSpore).  Each row records the sentences it ran on.
- FLOPs: useful GFLOP/s = sentences/s * matmul FLOPs of each sentence at its
  own length with the prompt (bench/roofline.py, flops_per_sequence), and its
  fraction of the GEMM limit measured by bench/roofline.py (read from
  --roofline, or measured now if that file is missing); executed GFLOP/s
  counts the padded shapes the backend really ran.
- cold start: wall time of a new `pt-run predict` process on 10 lines
  (import, load and hash-check the bundle, predict, print, exit).
Everything runs in this one invocation, so the ratios compare like with like.
Writes bench/results/inference.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

import roofline
from common import cpu_threads, every_kth, machine_info, spread, subset_name
from ptbundle.runtime.data import load_mr
from ptbundle.runtime import Bundle
from ptbundle.runtime.bundle import read_manifest
from ptbundle.runtime.text import batch_indices


def mr_test() -> tuple:
    """Texts and gold labels of the canonical MR test split, read as the builder reads it."""
    test = load_mr().test
    return [e.text for e in test], [e.label for e in test]


def batch_plan(lengths, batch_size: int, sort: bool, multiple: int) -> list:
    """(rows, padded length) of every batch a pass runs, as Bundle.logits batches and pads them."""
    lengths = np.asarray(lengths)
    return [(len(b), -(-int(lengths[b].max()) // multiple) * multiple)
            for b in batch_indices(lengths, batch_size, sort)]


def flop_counts(lengths, batch_size: int, sort: bool, multiple: int, virtual_tokens: int, cfg) -> dict:
    """Useful FLOPs (each sentence at its length) and executed FLOPs (padded batches) of one pass."""
    useful = roofline.flops_of_lengths(lengths, virtual_tokens, cfg)
    executed = sum(roofline.flops_of_batch(rows, seq, virtual_tokens, cfg)
                   for rows, seq in batch_plan(lengths, batch_size, sort, multiple))
    return {"useful": useful, "executed": executed}


def throughput(bundle: Bundle, texts, batch_size: int, repeats: int, sort: bool = True) -> tuple:
    """Seconds per pass over `texts`, `repeats` passes after a two-batch warm-up; the last pass's predictions."""
    bundle.predict(texts[: batch_size * 2], batch_size=batch_size, sort_by_length=sort)  # warm-up (MindSpore compiles)
    seconds, predictions = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        predictions = bundle.predict(texts, batch_size=batch_size, sort_by_length=sort)
        seconds.append(time.perf_counter() - t)
    return seconds, predictions


def throughput_row(bundle, texts, gold, subset: str, batch_size: int, sort: bool, repeats: int, flops: dict,
                   limit_gflops: float) -> dict:
    seconds, predictions = throughput(bundle, texts, batch_size, repeats, sort)
    useful = [flops["useful"] / s / 1e9 for s in seconds]
    return {"batch_size": batch_size, "sorted": sort, "sentences": len(texts), "subset": subset,
            "sentences_per_second": spread([len(texts) / s for s in seconds], 2),
            "useful_gflops": spread(useful, 2),
            "executed_gflops": spread([flops["executed"] / s / 1e9 for s in seconds], 2),
            "fraction_of_limit": spread([g / limit_gflops for g in useful], 3),
            "useful_gflop_per_sentence": round(flops["useful"] / len(texts) / 1e9, 5),
            "padding_overhead": round(flops["executed"] / flops["useful"] - 1, 3),
            # on these sentences; the peer reports the same, a check that both run the same model
            "accuracy": round(float(np.mean([p.label == g for p, g in zip(predictions, gold)])), 4)}


def cold_start(bundle_path: str, args: list, repeats: int, texts) -> dict:
    pt_run = Path(sys.executable).parent / "pt-run"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(texts[:10]) + "\n")
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([str(pt_run), "predict", f.name, "--bundle", bundle_path, *args],
                       check=True, capture_output=True)
        seconds.append(time.perf_counter() - t)
    Path(f.name).unlink()
    return spread(seconds)


def backend_configs(manifest: dict, backends) -> list:
    """(name, Bundle.load kwargs, pt-run options) of every backend the bundle can run."""
    configs = []
    if "onnxruntime" in backends:
        configs.append(("onnxruntime fp32", {"backend": "onnxruntime"}, ["--backend", "onnxruntime"]))
        if "model.int8.onnx" in manifest["files"]:
            configs.append(("onnxruntime int8", {"backend": "onnxruntime", "int8": True},
                            ["--backend", "onnxruntime", "--int8"]))
    if "mindspore" in backends:
        configs.append(("mindspore fp32", {"backend": "mindspore"}, ["--backend", "mindspore"]))
    return configs


def model_shape(manifest: dict) -> roofline.ModelShape:
    """The FLOP-count shape from the manifest; the feed-forward width is BERT's 4 * hidden (MiniLM: 1536)."""
    backbone = manifest["backbone"]
    h = backbone["hidden_size"]
    return roofline.ModelShape(hidden_size=h, intermediate_size=4 * h, num_layers=backbone["layers"],
                               num_labels=len(manifest["labels"]))


def load_limit(path: str) -> dict:
    """The GEMM roofline of this run: read it if bench/roofline.py wrote one, else measure it now."""
    if Path(path).is_file():
        result = json.loads(Path(path).read_text())
        result["source"] = path
        return result
    click.echo(f"{path} not found: measuring the GEMM limit now (bench/roofline.py)")
    result = roofline.measure(repeats=10)
    result["source"] = "measured by bench/inference.py"
    return result


def int_list(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


HEADER = f"{'config':<18}{'batch':>6}{'sorted':>7}{'sents':>6}{'sentences/s':>12} {'[min-max]':<15}{'GFLOP/s':>8}{'limit':>8}"


def format_row(name: str, row: dict) -> str:
    r, g, f = row["sentences_per_second"], row["useful_gflops"], row["fraction_of_limit"]
    span = f"[{r['min']:.1f}-{r['max']:.1f}]"
    return (f"{name:<18}{row['batch_size']:>6}{'on' if row['sorted'] else 'off':>7}{row['sentences']:>6}"
            f"{r['median']:>12.1f} {span:<15}{g['median']:>8.1f}{f['median']:>8.1%}")


@click.command()
@click.option("--bundle", "bundle_path", default="exports/mr-soft", show_default=True)
@click.option("--batch-sizes", default="1,8,64", show_default=True)
@click.option("--batch-size", default=None, type=int, help="One batch size only (overrides --batch-sizes).")
@click.option("--sorting", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="Sorted-length batching (the runtime's) and/or input order.")
@click.option("--backends", default="onnxruntime,mindspore", show_default=True)
@click.option("--repeats", default=5, show_default=True, help="Timed passes per row.")
@click.option("--cold-repeats", default=None, type=int, help="pt-run cold starts per backend [default: --repeats].")
@click.option("--every", default=1, show_default=True, help="Batch 8/64 run on every K-th MR test sentence.")
@click.option("--every-batch1", default=4, show_default=True, help="Batch 1 runs on every K-th MR test sentence.")
@click.option("--roofline", "roofline_path", default="bench/results/roofline.json", show_default=True)
@click.option("--out", default="bench/results/inference.json", show_default=True)
def main(bundle_path, batch_sizes, batch_size, sorting, backends, repeats, cold_repeats, every, every_batch1,
         roofline_path, out):
    sizes = [batch_size] if batch_size else int_list(batch_sizes)
    sorts = {"both": [True, False], "on": [True], "off": [False]}[sorting]
    texts, gold = mr_test()
    manifest = read_manifest(Path(bundle_path))
    virtual_tokens, cfg = manifest.get("num_virtual_tokens", 0), model_shape(manifest)
    limit = load_limit(roofline_path)
    limit_gflops = limit["limit_gflops"]
    click.echo(f"GEMM limit {limit_gflops:.1f} GFLOP/s ({limit['limit_library']}, {limit['source']}); "
               f"{cpu_threads()} threads")
    click.echo(HEADER)
    rows, mean_gflop = [], 0.0
    for name, load_args, cli_args in backend_configs(manifest, backends.split(",")):
        bundle = Bundle.load(bundle_path, **load_args)
        lengths = [len(e.ids) for e in bundle.encode(texts)]
        mean_gflop = roofline.flops_of_lengths(lengths, virtual_tokens, cfg) / len(lengths) / 1e9
        row = {"config": name, "throughput": []}
        for size in sizes:
            k = every_batch1 if size == 1 else every
            for sort in (sorts if size > 1 else [True]):  # one row per batch: order is irrelevant
                flops = flop_counts(every_kth(lengths, k), size, sort, bundle.model.pad_multiple, virtual_tokens, cfg)
                measured = throughput_row(bundle, every_kth(texts, k), every_kth(gold, k), subset_name(len(texts), k),
                                          size, sort, repeats, flops, limit_gflops)
                row["throughput"].append(measured)
                click.echo(format_row(name, measured))
        del bundle
        row["cold_start_seconds"] = cold_start(bundle_path, cli_args, cold_repeats or repeats, texts)
        c = row["cold_start_seconds"]
        click.echo(f"{name:<18} cold start {c['median']:.2f} s (min {c['min']:.2f}, max {c['max']:.2f})")
        rows.append(row)
    import onnxruntime
    import tokenizers

    versions = dict(manifest.get("versions") or {}, onnxruntime_run=onnxruntime.__version__,
                    tokenizers_run=tokenizers.__version__, numpy_run=np.__version__)
    threads = {"onnxruntime_intra_op": cpu_threads()}  # what runtime/onnx_backend.py sets
    if "mindspore" in sys.modules:
        versions["mindspore_run"] = sys.modules["mindspore"].__version__
        threads["mindspore_runtime_num_threads"] = sys.modules["mindspore"].get_context("runtime_num_threads")
    result = {"bundle": bundle_path, "sentences": len(texts), "batch_sizes": sizes, "repeats": repeats,
              "virtual_tokens": virtual_tokens, "threads": threads,
              "mean_useful_gflop_per_sentence": round(mean_gflop, 4),
              "limit": {k: limit[k] for k in ("limit_gflops", "limit_library", "tokens", "source")},
              "machine": machine_info(), "versions": versions, "results": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"-> {out}")


if __name__ == "__main__":
    main()
