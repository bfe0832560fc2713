"""Score bundles on labelled data, side by side: accuracy, macro-F1, throughput.

    pt-run eval --bundle exports/mr-soft --bundle exports/mr-hard-probe --data mr --split test

Every bundle sees the same examples through its own `Bundle.predict` path
(template, tokenizer, graph), so the numbers compare what a user would get.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .data import Columns, load_mr, read_examples
from .errors import DataError, InputError
from .metrics import classification_metrics


def load_eval_examples(data: str, split: str, columns: Columns) -> tuple:
    """(examples, description): MR's canonical dev/test split, or every row of a labelled file."""
    if data == "mr":
        return getattr(load_mr(), split), f"mr {split}"
    return read_examples(data, columns), str(data)


def check_examples(bundle, examples, task: str | None = None, data: str = "data") -> None:
    """The examples fit the bundle's `task`: its labels, one text or two; a DataError naming the example (or
    `data`, for examples without a file line, e.g. MR's) if not."""
    bundle.no_labels()  # a generation bundle has none to score
    spec = bundle.manifest.task(task)
    labels, pair = list(spec.labels), spec.pair
    known = set(labels)
    for e in examples:
        if e.label not in known:
            raise DataError(f"{e.where or data}: label {e.label!r} is not one of the bundle's labels"
                            f" ({', '.join(labels)})")
        if (e.text_b is not None) != pair:
            need = "two texts (a sentence-pair bundle)" if pair else "one text"
            raise DataError(f"{e.where or data}: {bundle.directory} takes {need} per example")


def score(bundle, examples, batch_size: int = 64, task: str | None = None) -> dict:
    """Metrics of one bundle (of its `task`, for a multi-task bundle) on labelled examples, and its throughput
    (tokenization included)."""
    check_examples(bundle, examples, task)
    spec = bundle.manifest.task(task)
    labels, pair = list(spec.labels), spec.pair
    index = {label: i for i, label in enumerate(labels)}
    texts = [e.text for e in examples]
    texts_b = [e.text_b for e in examples] if pair else None
    started = time.perf_counter()
    logits = bundle.logits(texts, texts_b, batch_size, task=spec.name)
    seconds = time.perf_counter() - started
    gold = np.array([index[e.label] for e in examples])
    result = classification_metrics(logits.argmax(-1), gold, len(labels))
    result["sentences_per_second"] = round(len(examples) / seconds, 1)
    return result


def table(rows: list) -> str:
    header = f"{'bundle':<30} {'kind':<16} {'accuracy':>8} {'macro-F1':>8} {'sent/s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['bundle']:<30} {r['kind']:<16} {100 * r['accuracy']:>8.2f} {100 * r['macro_f1']:>8.2f} "
                     f"{r['sentences_per_second']:>8.1f}")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot, drawing into files; without it (the plot extra), one line naming the extra."""
    try:  # the plot extra: imported only for --plot
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("--plot needs matplotlib: pip install 'ptbundle[plot]'") from e
    return plt


def check_plot(path: Path) -> None:
    """What `plot` needs, checked before any bundle is scored: matplotlib, and a directory to write into."""
    pyplot()
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"--plot {path}: no directory {folder} to write it into")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--plot {path}: cannot write into {folder} (permission denied)")


def plot(rows: list, title: str, path: Path) -> None:
    """Bar chart PNG: accuracy and macro-F1 per bundle, and throughput beside them."""
    plt = pyplot()
    names = [Path(r["bundle"]).name for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(rows), 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for offset, key, label in ((-0.2, "accuracy", "accuracy"), (0.2, "macro_f1", "macro-F1")):
        values = [100 * r[key] for r in rows]
        bars = left.bar(x + offset, values, 0.4, label=label)
        left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks(x, names, rotation=15)
    left.set_ylabel("%")
    left.set_ylim(0, 100)
    left.legend(loc="lower right")
    left.set_title(title)
    bars = right.bar(x, [r["sentences_per_second"] for r in rows], 0.6, color="tab:gray")
    right.bar_label(bars, fmt="%.0f", fontsize=8)
    right.set_xticks(x, names, rotation=15)
    right.set_ylabel("sentences / s")
    right.set_title("throughput")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
    except OSError as e:
        raise InputError(f"--plot {path}: cannot write it ({e.strerror})") from e
    finally:
        plt.close(fig)
    tmp.replace(path)  # a finished file or none
