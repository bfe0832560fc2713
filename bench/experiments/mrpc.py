"""Sentence pairs end to end: GLUE MRPC through pt-build, pt-run eval and pt-run predict.

    .venv/bin/python bench/experiments/mrpc.py [--data ../shared/data/mrpc] [--backbone DIR] [--epochs N]

--data is a directory with train.tsv and dev.tsv in GLUE's MRPC columns
(other columns: --text-column, --text-b-column, --label-column).  MRPC is
read where it lies (its licence is non-commercial: it is never copied into
the project).  The best epoch is chosen on a validation split carved from
train (every 10th pair), so GLUE's dev set stays unseen until it is scored:
accuracy and F1 of label 1 (MRPC: paraphrase), against the majority
baseline (always the most frequent training label; MRPC: 68.4% accuracy,
81.2 F1).  The bundle is then scored again from its files by `pt-run eval`,
and two pairs are predicted by `pt-run predict` from tab-separated lines.
Writes <results>/mrpc.json; the bundle goes to --bundle (exports/mrpc-soft;
with --smoke, <results>/mrpc-soft).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

PAIRS = "The cat sat on the mat.\tA cat was sitting on the mat.\nThe company lost money.\tShares rose 5% today.\n"


def split_train(train: Path, directory: Path) -> tuple:
    """train.tsv -> (fit.tsv, validation.tsv): every 10th pair validates."""
    lines = train.read_text(encoding="utf-8-sig").split("\n")
    header, rows = lines[0], [line for line in lines[1:] if line.strip()]
    fit, validation = directory / "fit.tsv", directory / "validation.tsv"
    fit.write_text("\n".join([header] + [r for i, r in enumerate(rows) if i % 10]) + "\n", encoding="utf-8")
    validation.write_text("\n".join([header] + rows[::10]) + "\n", encoding="utf-8")
    return fit, validation


def majority(dataset) -> dict:
    """Accuracy and F1 on dev of always predicting the most frequent training label."""
    label = Counter(e.label for e in dataset.train).most_common(1)[0][0]
    gold = dataset.label_ids(dataset.dev)
    m = common.metrics([dataset.labels.index(label)] * len(gold), gold, len(dataset.labels))
    return {"label": label, "accuracy": round(m["accuracy"], 4), "f1": round(m.get("f1", m["macro_f1"]), 4)}


@click.command()
@common.options(data=str(common.ROOT.parent / "shared" / "data" / "mrpc"),
                data_help="Directory with train.tsv and dev.tsv (sentence pairs).")
@click.option("--text-column", default="#1 String", show_default=True)
@click.option("--text-b-column", default="#2 String", show_default=True)
@click.option("--label-column", default="Quality", show_default=True)
@click.option("--epochs", default=None, type=int, help="[default: the recipe's]")
@click.option("--bundle", "bundle_dir", default=None, help="[default: exports/mrpc-soft; --smoke: <results>/mrpc-soft]")
def main(backbone, data, smoke, results, text_column, text_b_column, label_column, epochs, bundle_dir):
    mrpc = Path(data)
    bundle = Path(bundle_dir or (Path(results) / "mrpc-soft" if smoke else common.ROOT / "exports" / "mrpc-soft"))
    cols = ["--text-column", text_column, "--text-b-column", text_b_column, "--label-column", label_column]
    dataset = common.load_data(str(mrpc), common.Columns(text_column, label_column, text_b_column))
    sizes = ["--epochs", "1", "--virtual-tokens", "4", "--batch-size", "8"] if smoke else \
        (["--epochs", str(epochs)] if epochs else [])
    with tempfile.TemporaryDirectory() as tmp:
        fit, validation = split_train(mrpc / "train.tsv", Path(tmp))
        build = [common.tool("pt-build"), "export", "--prompt", "soft", "--train", str(fit), "--dev", str(validation),
                 "--test", str(mrpc / "dev.tsv"), *cols, *sizes, "--out", str(bundle.parent), "--name", bundle.name]
        build += ["--backbone", backbone] if backbone else []
        click.echo("$ " + " ".join(build))
        started = time.time()
        subprocess.run(build, check=True)
        build_seconds = time.time() - started
    evaluate = [common.tool("pt-run"), "eval", "--bundle", str(bundle), "--data", str(mrpc / "dev.tsv"), *cols, "--json"]
    report = json.loads(subprocess.run(evaluate, check=True, capture_output=True, text=True).stdout)["results"][0]
    predicted = subprocess.run([common.tool("pt-run"), "predict", "-", "--bundle", str(bundle)], input=PAIRS,
                               check=True, capture_output=True, text=True).stdout
    baseline = majority(dataset)
    click.echo(f"{mrpc.name} dev ({report['n']} pairs): accuracy {100 * report['accuracy']:.2f}  "
               f"F1 {100 * report['f1']:.2f}   majority baseline: accuracy {100 * baseline['accuracy']:.2f}  "
               f"F1 {100 * baseline['f1']:.2f}   (build {build_seconds:.0f} s)")
    click.echo("pt-run predict on two pairs:\n" + predicted)
    common.write_results(results, "mrpc", {
        "data": str(mrpc), "bundle": str(bundle), "smoke": smoke, "dev_accuracy": report["accuracy"],
        "dev_f1": report["f1"], "dev_macro_f1": report["macro_f1"], "majority_baseline": baseline,
        "epochs": 1 if smoke else (epochs or common.recipe().epochs), "build_seconds": round(build_seconds),
        "manifest_metrics": common.read_manifest(bundle)["metrics"]})


if __name__ == "__main__":
    main()
