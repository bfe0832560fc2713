"""How many unlabelled texts the decoder's zero-shot calibration needs: dev accuracy by sample size.

    .venv/bin/python bench/experiments/calibration_size.py [--backbone smollm2] [--texts 3000]

The zero-shot head subtracts each label's mean log-probability on unlabelled
training text (builder.hard.lm_zero_shot_head).  On a 135M decoder every
calibration text costs a pass through all 30 layers, about a tenth of a
second here, so the sample's size is a real part of the build's time.  This
runs --texts training texts (one seeded permutation) and the dev split once
through the MR template (the builder's FeatureCache), then scores dev with the
prior taken from disjoint slices of each size: mean, min and max over the
slices.  Dev only.  Writes <results>/calibration_size.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

SIZES = (250, 500, 1000, 1500, 2000)


@click.command()
@common.options()
@click.option("--texts", default=3000, show_default=True, help="Training texts run once; the slices come from them.")
def main(backbone, data, smoke, results, texts):
    bb = common.load_backbone(backbone or "smollm2")
    dataset, recipe = common.load_data(data), common.recipe()
    texts, sizes = (32, (8, 16)) if smoke else (min(texts, len(dataset.train)), SIZES)
    cache = common.FeatureCache(bb, dataset, recipe, common.Template.parse(common.MR_DECODER_TEMPLATE),
                                log=lambda m: None)
    verbalizer = common.Verbalizer.parse(("positive=positive", "negative=negative"), dataset.labels)
    rows = common.label_rows(bb, cache.tokenizer, verbalizer.descriptions, dataset.labels)
    dev, gold, _ = cache.split("dev")
    unlabelled = cache.sample("train", texts, recipe.seed)
    out = []
    for size in sizes:
        accuracies = []
        for start in range(0, texts - size + 1, size):  # disjoint slices
            head = common.lm_zero_shot_head(rows, unlabelled[start : start + size])
            predicted = (dev @ head["classifier.weight"].T + head["classifier.bias"]).argmax(-1)
            accuracies.append(common.metrics(predicted, gold, len(dataset.labels))["accuracy"])
        out.append({"texts": size, "slices": len(accuracies), "dev_accuracy": common.spread(accuracies, 4),
                    "mean": round(float(np.mean(accuracies)), 4), "all": [round(a, 4) for a in accuracies]})
        click.echo(f"{size:>5} texts x {len(accuracies)} slices: dev mean {out[-1]['mean']:.4f}"
                   f" [{min(accuracies):.4f}-{max(accuracies):.4f}]")
    common.write_results(results, "calibration_size", {"backbone": bb.name, "data": data, "smoke": smoke,
                                                       "texts": texts, "rows": out})


if __name__ == "__main__":
    main()
