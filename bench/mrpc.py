"""Sentence pairs end to end: GLUE MRPC through pt-build, pt-run eval and pt-run predict.

    .venv/bin/python bench/mrpc.py [--mrpc ../shared/data/mrpc] [--epochs 2]

MRPC is read where it lies (its licence is non-commercial: it is never
copied into the project).  The best epoch is chosen on a validation split
carved from train (every 10th pair), so GLUE's dev set stays unseen until
it is scored: accuracy and F1 of the paraphrase class, against the majority
baseline (always "paraphrase": 68.4% accuracy, 81.2 F1).  The bundle is
then scored again from its files by `pt-run eval`, and a few pairs are
predicted by `pt-run predict` from tab-separated lines.
Writes bench/results/mrpc.json; the bundle goes to exports/mrpc-soft.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from ptbundle.runtime.bundle import read_manifest

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["--text-column", "#1 String", "--text-b-column", "#2 String", "--label-column", "Quality"]
MAJORITY = {"accuracy": 0.684, "f1": 0.812}


def split_train(train: Path, directory: Path) -> tuple:
    """train.tsv -> (fit.tsv, validation.tsv): every 10th pair validates."""
    lines = train.read_text(encoding="utf-8-sig").split("\n")
    header, rows = lines[0], [line for line in lines[1:] if line.strip()]
    fit, validation = directory / "fit.tsv", directory / "validation.tsv"
    fit.write_text("\n".join([header] + [r for i, r in enumerate(rows) if i % 10]) + "\n", encoding="utf-8")
    validation.write_text("\n".join([header] + rows[::10]) + "\n", encoding="utf-8")
    return fit, validation


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@click.command()
@click.option("--mrpc", "mrpc_dir", default=str(ROOT.parent / "shared" / "data" / "mrpc"), show_default=True,
              type=click.Path(exists=True, file_okay=False))
@click.option("--epochs", default=2, show_default=True)
@click.option("--out", default="bench/results/mrpc.json", show_default=True)
@click.option("--bundle", "bundle_dir", default="exports/mrpc-soft", show_default=True)
def main(mrpc_dir, epochs, out, bundle_dir):
    mrpc, bundle = Path(mrpc_dir), Path(bundle_dir)
    with tempfile.TemporaryDirectory() as tmp:
        fit, validation = split_train(mrpc / "train.tsv", Path(tmp))
        build = [tool("pt-build"), "export", "--prompt", "soft", "--train", str(fit), "--dev", str(validation),
                 "--test", str(mrpc / "dev.tsv"), *COLUMNS, "--epochs", str(epochs),
                 "--out", str(bundle.parent), "--name", bundle.name]
        click.echo("$ " + " ".join(build))
        started = time.time()
        subprocess.run(build, check=True)
        build_seconds = time.time() - started
    evaluate = [tool("pt-run"), "eval", "--bundle", str(bundle), "--data", str(mrpc / "dev.tsv"), *COLUMNS, "--json"]
    report = json.loads(subprocess.run(evaluate, check=True, capture_output=True, text=True).stdout)["results"][0]
    pairs = "The cat sat on the mat.\tA cat was sitting on the mat.\nThe company lost money.\tShares rose 5% today.\n"
    predicted = subprocess.run([tool("pt-run"), "predict", "-", "--bundle", str(bundle)], input=pairs,
                               check=True, capture_output=True, text=True).stdout
    result = {"dev_accuracy": report["accuracy"], "dev_f1": report["f1"], "dev_macro_f1": report["macro_f1"],
              "majority_baseline": MAJORITY, "epochs": epochs, "build_seconds": round(build_seconds),
              "manifest_metrics": read_manifest(bundle)["metrics"]}
    click.echo(f"MRPC dev (GLUE, 408 pairs): accuracy {100 * report['accuracy']:.2f}  F1 {100 * report['f1']:.2f}"
               f"   majority baseline: accuracy 68.40  F1 81.20   (build {build_seconds:.0f} s)")
    click.echo("pt-run predict on two pairs:\n" + predicted)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"-> {out}")


if __name__ == "__main__":
    main()
