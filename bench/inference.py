"""Inference speed of a bundle: throughput on MR test and cold start of pt-run.

    .venv/bin/python bench/inference.py [--bundle exports/mr-soft] [--batch-size 64] [--repeats 5]

For each backend (onnxruntime fp32, onnxruntime int8 when the bundle has it,
MindSpore fp32):
- throughput: sentences/s over full passes of the 1,068 MR test sentences
  (min/median/max of --repeats passes, after one warm-up pass);
- cold start: wall time of a new `pt-run predict` process on 10 lines
  (import, load and hash-check the bundle, predict, print, exit).
Everything runs in this one invocation, so the ratios compare like with like.
Writes bench/results/inference.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from ptbundle.runtime import Bundle


def mr_test_texts() -> list:
    """The canonical MR test split, read as the builder reads it (ptbundle.builder.data is light)."""
    from ptbundle.builder.data import load_mr

    return [e.text for e in load_mr().test]


def spread(values) -> dict:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def throughput(bundle: Bundle, texts, batch_size: int, repeats: int) -> dict:
    bundle.predict(texts[: batch_size * 2], batch_size=batch_size)  # warm-up (MindSpore compiles here)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        bundle.predict(texts, batch_size=batch_size)
        rates.append(len(texts) / (time.perf_counter() - t))
    return spread(rates)


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


@click.command()
@click.option("--bundle", "bundle_path", default="exports/mr-soft", show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--out", default="bench/results/inference.json", show_default=True)
def main(bundle_path, batch_size, repeats, out):
    texts = mr_test_texts()
    manifest = json.loads((Path(bundle_path) / "manifest.json").read_text())
    configs = [("onnxruntime fp32", {"backend": "onnxruntime"}, ["--backend", "onnxruntime"])]
    if "model.int8.onnx" in manifest["files"]:
        configs.append(("onnxruntime int8", {"backend": "onnxruntime", "int8": True}, ["--backend", "onnxruntime", "--int8"]))
    configs.append(("mindspore fp32", {"backend": "mindspore"}, ["--backend", "mindspore"]))
    rows = []
    for name, load_args, cli_args in configs:
        bundle = Bundle.load(bundle_path, **load_args)
        row = {"config": name,
               "sentences_per_second": throughput(bundle, texts, batch_size, repeats),
               "cold_start_seconds": cold_start(bundle_path, cli_args, repeats, texts)}
        rows.append(row)
        del bundle
        click.echo(f"{name:<18} {row['sentences_per_second']['median']:>8.1f} sentences/s "
                   f"(min {row['sentences_per_second']['min']:.1f}, max {row['sentences_per_second']['max']:.1f})   "
                   f"cold start {row['cold_start_seconds']['median']:.2f} s "
                   f"(min {row['cold_start_seconds']['min']:.2f}, max {row['cold_start_seconds']['max']:.2f})")
    result = {"bundle": bundle_path, "sentences": len(texts), "batch_size": batch_size, "repeats": repeats,
              "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
              "versions": manifest.get("versions"), "results": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"-> {out}")


if __name__ == "__main__":
    main()
