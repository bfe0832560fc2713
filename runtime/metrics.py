"""Accuracy and F1 from predicted and true label ids."""

from __future__ import annotations

import numpy as np


def classification_metrics(predicted, gold, num_labels: int) -> dict:
    predicted, gold = np.asarray(predicted), np.asarray(gold)
    f1s = []
    for label in range(num_labels):
        tp = np.sum((predicted == label) & (gold == label))
        fp = np.sum((predicted == label) & (gold != label))
        fn = np.sum((predicted != label) & (gold == label))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    metrics = {
        "n": int(len(gold)),
        "accuracy": float(np.mean(predicted == gold)) if len(gold) else 0.0,
        "macro_f1": float(np.mean(f1s)),
    }
    if num_labels == 2:  # the F1 GLUE reports for binary tasks: of label 1
        metrics["f1"] = float(f1s[1])
    return metrics
