"""How the MR hard prompt's template and verbalizer were chosen: on dev only.

    .venv/bin/python bench/experiments/zero_shot_search.py [--backbone DIR] [--data mr] [--calibration 2000]

For every candidate template, the dev split is encoded once (the builder's
FeatureCache); every verbalizer (sets of label descriptions, LABEL=TEXT as
pt-build's --label-text takes them) is then scored on those features with
and without the prior calibration that pt-build uses.  Prints the dev
accuracy of each combination, best first, and the share of predictions of
the last label (MR: "positive"; a naive verbalizer leans to one label);
writes <results>/zero_shot_search.json.  Test accuracy is printed for the
dev-best combination only, after choosing.  The built-in verbalizers
describe MR's labels; for other data, give --label-text (else each label is
described by its name), and --template to replace the candidate templates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

TEMPLATES = [
    "{text}",
    "Review: {text} It was",
    "{text} It was",
    "A movie review: {text}",
    "{text} All in all, the movie was",
    "Movie review: {text} Overall, it was",
]


def described(label: str, *texts) -> list:
    return [f"{label}={t}" for t in texts]


VERBALIZERS = {
    "naive": described("positive", "This is a positive review.") + described("negative", "This is a negative review."),
    "great/terrible": described("positive", "It was great.") + described("negative", "It was terrible."),
    "good/bad words": described("positive", "good", "great", "excellent", "wonderful")
    + described("negative", "bad", "terrible", "awful", "boring"),
    "movie opinions": described("positive", "It was great.", "A wonderful, moving film.", "I loved this movie.",
                                "Highly recommended.")
    + described("negative", "It was terrible.", "A dull, tedious film.", "I hated this movie.", "A waste of time."),
    "critic": described("positive", "The critic loved the film.", "A positive review of a good movie.")
    + described("negative", "The critic hated the film.", "A negative review of a bad movie."),
}


def candidates(labels, label_texts) -> dict:
    """name -> LABEL=TEXT list: --label-text if given, else the built-in ones that describe these labels."""
    if label_texts:
        return {"--label-text": list(label_texts)}
    usable = {name: items for name, items in VERBALIZERS.items()
              if {i.partition("=")[0] for i in items} <= set(labels)}
    return usable or {"label names": []}


@click.command()
@common.options()
@click.option("--calibration", default=2000, show_default=True, help="Unlabelled training texts for the prior.")
@click.option("--template", "templates", multiple=True, help="Candidate template (repeat) [default: six for MR].")
@click.option("--label-text", "label_texts", multiple=True, metavar="LABEL=TEXT",
              help="One verbalizer to try instead of the built-in ones (repeat, as pt-build's --label-text).")
def main(backbone, data, smoke, results, calibration, templates, label_texts):
    bb, dataset, recipe = common.load_backbone(backbone), common.load_data(data), common.recipe()
    templates = list(templates) or TEMPLATES
    verbalizers = candidates(dataset.labels, label_texts)
    if smoke:
        templates, verbalizers = templates[:2], dict(list(verbalizers.items())[:2])
        calibration = 16
    last = len(dataset.labels) - 1
    # One encoder serves every template: MindSpore keeps compiled graphs per
    # network, so a network per template would hold GBs for nothing.
    cache = common.FeatureCache(bb, dataset, recipe, None, log=lambda m: None)
    label_features = {}
    for name, items in verbalizers.items():
        descriptions = common.Verbalizer.parse(items, dataset.labels).descriptions
        label_features[name] = [cache.texts(descriptions[label]) for label in dataset.labels]

    def head(name: str, calibrated: bool, unlabelled):
        return common.zero_shot_head(label_features[name], unlabelled if calibrated else None)

    rows, saved = [], {}
    for source in templates:
        cache.template, cache.cache = common.Template.parse(source, pair=dataset.is_pair), {}
        dev, gold, _ = cache.split("dev")
        saved[source] = unlabelled = cache.sample("train", calibration, recipe.seed)
        for name in verbalizers:
            for calibrated in (False, True):
                predicted = common.head_logits(dev, head(name, calibrated, unlabelled), normalize=True).argmax(-1)
                m = common.metrics(predicted, gold, len(dataset.labels))
                rows.append({"template": source, "verbalizer": name, "calibrated": calibrated,
                             "dev_accuracy": m["accuracy"], "last_label_share": float((predicted == last).mean())})
                click.echo(f"{m['accuracy']:.4f}  {dataset.labels[last][:3]} {rows[-1]['last_label_share']:.2f}  "
                           f"{'calibrated' if calibrated else 'raw':<10}  {name:<15} {source}")
    rows.sort(key=lambda r: -r["dev_accuracy"])
    best = rows[0]
    click.echo("\nbest on dev: " + json.dumps(best))
    test_accuracy = None
    if dataset.test:
        cache.template, cache.cache = common.Template.parse(best["template"], pair=dataset.is_pair), {}
        test, gold, _ = cache.split("test")
        chosen = head(best["verbalizer"], best["calibrated"], saved[best["template"]])
        test_accuracy = float((common.head_logits(test, chosen, normalize=True).argmax(-1) == gold).mean())
        click.echo(f"its test accuracy: {test_accuracy:.4f}")
    common.write_results(results, "zero_shot_search", {
        "backbone": bb.name, "data": data, "smoke": smoke, "labels": list(dataset.labels), "rows": rows,
        "best": best, "best_test_accuracy": test_accuracy, "verbalizers": verbalizers})


if __name__ == "__main__":
    main()
