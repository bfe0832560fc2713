"""Prediction throughput of a bundle on the MR test split.

    .venv/bin/python bench/throughput.py [--bundle exports/mr-soft] [--batch-size 64] [--repeats 5]

Prints min/median/max sentences per second over repeated full passes (the
first pass, which compiles, is reported separately) and writes the figures
to bench/results/throughput.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import click

from ptbundle.runtime import Bundle

MR_DIR = Path(__file__).resolve().parent.parent / "data" / "mr"


def mr_test_texts() -> list:
    """The canonical MR test split (line i % 10 == 0 of each file), as plain text."""
    texts = []
    for name in ("rt-polarity.neg", "rt-polarity.pos"):
        lines = (MR_DIR / name).read_bytes().decode("cp1252").split("\n")
        texts += [line.strip() for i, line in enumerate(lines) if line.strip() and i % 10 == 0]
    return texts


@click.command()
@click.option("--bundle", "bundle_path", default="exports/mr-soft", show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--out", default="bench/results/throughput.json", show_default=True)
def main(bundle_path, batch_size, repeats, out):
    texts = mr_test_texts()
    started = time.perf_counter()
    bundle = Bundle.load(bundle_path)
    load_seconds = time.perf_counter() - started
    first = time.perf_counter()
    bundle.predict(texts, batch_size=batch_size)
    first = time.perf_counter() - first
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        bundle.predict(texts, batch_size=batch_size)
        rates.append(len(texts) / (time.perf_counter() - t))
    result = {
        "bundle": bundle_path, "sentences": len(texts), "batch_size": batch_size,
        "load_seconds": round(load_seconds, 3), "first_pass_seconds": round(first, 3),
        "sentences_per_second": {"min": round(min(rates), 1), "median": round(statistics.median(rates), 1),
                                 "max": round(max(rates), 1)},
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    s = result["sentences_per_second"]
    click.echo(f"{bundle_path}: {len(texts)} MR test sentences, batch {batch_size}: "
               f"median {s['median']} sentences/s (min {s['min']}, max {s['max']}, {repeats} passes); "
               f"load {load_seconds:.2f} s, first pass {first:.2f} s -> {out}")


if __name__ == "__main__":
    main()
