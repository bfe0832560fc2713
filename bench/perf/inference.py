"""Inference speed of a bundle: throughput on --data's test sentences and cold start of pt-run.

    .venv/bin/python bench/perf/inference.py [--bundle exports/mr-soft] [--data mr] [--batch-sizes 1,8,64] [--repeats 5]

For each backend (onnxruntime fp32, onnxruntime int8 when the bundle has it,
MindSpore fp32, and with the openvino extra OpenVINO fp32 and, on a CPU with
bf16 units, bf16):
- throughput: sentences/s at each batch size through `Bundle.predict`, with
  its sorted-length batching and without it (`sort_by_length=False`:
  consecutive batches in input order); min/median/max of --repeats passes
  over the sentences, after a warm-up pass over two batches.  Batch 1 has one
  row per batch, so sorting changes nothing: measured once.  Batch 8 and 64
  run on the test split (dev if there is none; MR test: 1,068 sentences;
  --every K takes every K-th), batch 1 on every --every-batch1-th (all of MR
  test at batch 1 takes minutes on MindSpore).  Each row records the
  sentences it ran on.
- FLOPs: useful GFLOP/s = sentences/s * matmul FLOPs of each sentence at its
  own length with the prompt (perf/roofline.py, flops_per_sequence), and its
  fraction of the GEMM limit measured by perf/roofline.py (read from
  --roofline, or measured now with numpy if that file is missing); executed
  GFLOP/s counts the padded shapes the backend really ran.  The count knows
  the bundle's prompt method (manifest: prompt_method, num_virtual_tokens,
  recipe.layer): prompt tuning runs P more positions in every layer, a
  prefix adds P keys per layer (from its layer) and no positions, a late
  prompt P positions from its layer on (perf/roofline.py, PromptShape).
- accuracy: of the onnxruntime graphs on every sentence of the split (batch
  64, sorted), so that int8's loss against fp32 is measured on all of MR test;
- cold start: wall time of a new `pt-run predict` process on 10 lines
  (import, load and hash-check the bundle, predict, print, exit); with
  --smoke, of the first backend only.
Everything runs in this one invocation, so the ratios compare like with like.
Writes <results>/inference.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402
import roofline  # noqa: E402


def batch_plan(lengths, batch_size: int, sort: bool, multiple: int) -> list:
    """(rows, padded length) of every batch a pass runs, as Bundle.logits batches and pads them."""
    lengths = np.asarray(lengths)
    return [(len(b), -(-int(lengths[b].max()) // multiple) * multiple)
            for b in common.batch_indices(lengths, batch_size, sort)]


def flop_counts(lengths, batch_size: int, sort: bool, multiple: int, prompt, cfg) -> dict:
    """Useful FLOPs (each sentence at its length) and executed FLOPs (padded batches) of one pass."""
    useful = roofline.flops_of_lengths(lengths, prompt, cfg)
    executed = sum(roofline.flops_of_batch(rows, seq, prompt, cfg)
                   for rows, seq in batch_plan(lengths, batch_size, sort, multiple))
    return {"useful": useful, "executed": executed}


def throughput(bundle, texts, texts_b, batch_size: int, repeats: int, sort: bool) -> tuple:
    """Seconds per pass over the texts, `repeats` passes after a two-batch warm-up; the last pass's predictions."""
    warm = slice(0, batch_size * 2)
    bundle.predict(texts[warm], texts_b and texts_b[warm], batch_size=batch_size, sort_by_length=sort)
    seconds, predictions = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        predictions = bundle.predict(texts, texts_b, batch_size=batch_size, sort_by_length=sort)
        seconds.append(time.perf_counter() - t)
    return seconds, predictions


def accuracy(predictions, gold) -> float:
    return round(float(np.mean([p.label == g for p, g in zip(predictions, gold)])), 4)


def split_accuracy(bundle, texts, texts_b, gold) -> dict:
    """Accuracy on every sentence of the split (batch 64, sorted): what int8's loss against fp32 is read from."""
    return {"sentences": len(texts), "accuracy": accuracy(bundle.predict(texts, texts_b, batch_size=64), gold)}


def throughput_row(bundle, texts, texts_b, gold, subset: str, batch_size: int, sort: bool, repeats: int,
                   flops: dict, limit_gflops: float) -> dict:
    seconds, predictions = throughput(bundle, texts, texts_b, batch_size, repeats, sort)
    useful = [flops["useful"] / s / 1e9 for s in seconds]
    return {"batch_size": batch_size, "sorted": sort, "sentences": len(texts), "subset": subset,
            "sentences_per_second": common.spread([len(texts) / s for s in seconds], 2),
            "useful_gflops": common.spread(useful, 2),
            "executed_gflops": common.spread([flops["executed"] / s / 1e9 for s in seconds], 2),
            "fraction_of_limit": common.spread([g / limit_gflops for g in useful], 3),
            "useful_gflop_per_sentence": round(flops["useful"] / len(texts) / 1e9, 5),
            "padding_overhead": round(flops["executed"] / flops["useful"] - 1, 3),
            # on these sentences; the peer reports the same, a check that both run the same model
            "accuracy": accuracy(predictions, gold)}


def cold_start(bundle_path: str, args: list, repeats: int, lines: list) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines[:10]) + "\n")
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([common.tool("pt-run"), "predict", f.name, "--bundle", bundle_path, *args],
                       check=True, capture_output=True)
        seconds.append(time.perf_counter() - t)
    Path(f.name).unlink()
    return common.spread(seconds)


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
    if "openvino" in backends and common.openvino_installed():  # the openvino extra; bf16 where the CPU has bf16 units
        configs.append(("openvino fp32", {"backend": "openvino"}, ["--backend", "openvino"]))
        if common.machine_info()["bf16_units"]:
            configs.append(("openvino bf16", {"backend": "openvino", "precision": "bf16"},
                            ["--backend", "openvino", "--precision", "bf16"]))
    return configs


def load_limit(path: Path, cfg, smoke: bool) -> dict:
    """The GEMM roofline of this run: read it if perf/roofline.py wrote one, else measure numpy's now."""
    if path.is_file():
        return dict(json.loads(path.read_text()), source=str(path))
    click.echo(f"{path} not found: measuring numpy's GEMM rate now (bench/perf/roofline.py measures all libraries)")
    result = roofline.measure(cfg, 64 * 48, repeats=1 if smoke else 10, libraries=("numpy",),
                              min_seconds=0.005 if smoke else 0.05)
    return dict(result, source="numpy, measured by bench/perf/inference.py")


HEADER = f"{'config':<18}{'batch':>6}{'sorted':>7}{'sents':>6}{'sentences/s':>12} {'[min-max]':<15}{'GFLOP/s':>8}{'limit':>8}"


def format_row(name: str, row: dict) -> str:
    r, g, f = row["sentences_per_second"], row["useful_gflops"], row["fraction_of_limit"]
    span = f"[{r['min']:.1f}-{r['max']:.1f}]"
    return (f"{name:<18}{row['batch_size']:>6}{'on' if row['sorted'] else 'off':>7}{row['sentences']:>6}"
            f"{r['median']:>12.1f} {span:<15}{g['median']:>8.1f}{f['median']:>8.1%}")


@click.command()
@common.options(backbone_help="Must be the bundle's backbone (checked by sha256) [default: the bundle's].")
@click.option("--bundle", "bundle_path", default="exports/mr-soft", show_default=True)
@click.option("--batch-sizes", default="1,8,64", show_default=True)
@click.option("--sorting", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="Sorted-length batching (the runtime's) and/or input order.")
@click.option("--backends", default="onnxruntime,mindspore,openvino", show_default=True,
              help="openvino: only where the openvino extra is installed.")
@click.option("--repeats", default=5, show_default=True, help="Timed passes per row.")
@click.option("--cold-repeats", default=None, type=int, help="pt-run cold starts per backend [default: --repeats].")
@click.option("--every", default=1, show_default=True, help="Batch 8/64 run on every K-th test sentence.")
@click.option("--every-batch1", default=4, show_default=True, help="Batch 1 runs on every K-th test sentence.")
@click.option("--roofline", "roofline_path", default=None, help="[default: <results>/roofline.json]")
def main(backbone, data, smoke, results, bundle_path, batch_sizes, sorting, backends, repeats, cold_repeats, every,
         every_batch1, roofline_path):
    if smoke:
        batch_sizes, repeats, cold_repeats, every, every_batch1 = "1,8", 1, 1, 1, 1
    sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
    sorts = {"both": [True, False], "on": [True], "off": [False]}[sorting]
    manifest = common.read_manifest(bundle_path)
    common.check_backbone(manifest, backbone)
    split, examples = common.eval_split(common.load_data(data))
    if smoke:
        examples = examples[:32]
    texts, texts_b = common.split_texts(examples)
    gold = [e.label for e in examples]
    lines = texts if texts_b is None else [f"{a}\t{b}" for a, b in zip(texts, texts_b)]
    prompt, cfg = roofline.PromptShape.of_manifest(manifest), roofline.ModelShape.of_manifest(manifest)
    limit = load_limit(Path(roofline_path or Path(results) / "roofline.json"), cfg, smoke)
    limit_gflops = limit["limit_gflops"]
    click.echo(f"GEMM limit {limit_gflops:.1f} GFLOP/s ({limit['limit_library']}, {limit['source']}); "
               f"{common.cpu_threads()} threads; {len(texts)} {data} {split} sentences")
    click.echo(HEADER)
    rows, mean_gflop = [], 0.0
    for name, load_args, cli_args in backend_configs(manifest, backends.split(",")):
        bundle = common.open_bundle(bundle_path, **load_args)
        lengths = [len(e.ids) for e in bundle.encode(texts, texts_b)]
        mean_gflop = roofline.flops_of_lengths(lengths, prompt, cfg) / len(lengths) / 1e9
        # What runtime.tuning chose on this CPU (onnxruntime: measured at the first load, then read back)
        row = {"config": name, "throughput": [],
               "tuning": {"variant": bundle.model.variant, "token_budget": bundle.model.token_budget}}
        for size in sizes:
            k = every_batch1 if size == 1 else every
            subset = (common.every_kth(texts, k), texts_b and common.every_kth(texts_b, k))
            for sort in (sorts if size > 1 else [True]):  # one row per batch: order is irrelevant
                flops = flop_counts(common.every_kth(lengths, k), size, sort, bundle.model.pad_multiple,
                                    prompt, cfg)
                measured = throughput_row(bundle, *subset, common.every_kth(gold, k), common.subset_name(len(texts), k),
                                          size, sort, repeats, flops, limit_gflops)
                row["throughput"].append(measured)
                click.echo(format_row(name, measured))
        if load_args["backend"] != "mindspore":  # int8's and bf16's accuracy (MindSpore compiles per shape: slow)
            row["split_accuracy"] = a = split_accuracy(bundle, texts, texts_b, gold)
            click.echo(f"{name:<18} accuracy on all {a['sentences']} {split} sentences: {a['accuracy']:.4f}")
        del bundle
        row["cold_start_seconds"] = None  # --smoke: the first backend's only (pt-run with MindSpore takes seconds)
        if not (smoke and rows):
            row["cold_start_seconds"] = c = cold_start(bundle_path, cli_args, cold_repeats or repeats, lines)
            click.echo(f"{name:<18} cold start {c['median']:.2f} s (min {c['min']:.2f}, max {c['max']:.2f})")
        rows.append(row)
    import onnxruntime
    import tokenizers

    versions = dict(manifest.get("versions") or {}, onnxruntime_run=onnxruntime.__version__,
                    tokenizers_run=tokenizers.__version__, numpy_run=np.__version__)
    threads = {"onnxruntime_intra_op": common.cpu_threads()}  # what runtime/onnx_backend.py sets
    if "mindspore" in sys.modules:
        versions["mindspore_run"] = sys.modules["mindspore"].__version__
        threads["mindspore_runtime_num_threads"] = sys.modules["mindspore"].get_context("runtime_num_threads")
    common.write_results(results, "inference", {
        "bundle": bundle_path, "data": data, "split": split, "sentences": len(texts), "batch_sizes": sizes,
        "repeats": repeats, "smoke": smoke, "prompt": prompt.__dict__, "threads": threads,
        "mean_useful_gflop_per_sentence": round(mean_gflop, 4),
        "limit": {k: limit[k] for k in ("limit_gflops", "limit_library", "tokens", "source")},
        "machine": common.machine_info(), "versions": versions, "results": rows})


if __name__ == "__main__":
    main()
