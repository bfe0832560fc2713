"""How the MR hard prompt's template and verbalizer were chosen: on dev only.

    .venv/bin/python bench/zero_shot_search.py [--calibration 2000]

For every candidate template, MR dev is encoded once; every verbalizer (sets
of label descriptions) is then scored on those features with and without the
prior calibration that pt-build uses.  Prints the dev accuracy of each
combination, best first, and the share of "positive" predictions (a naive
verbalizer leans to one label); writes bench/results/zero_shot_search.json.
Test accuracy is printed for the dev-best combination only, after choosing.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

TEMPLATES = [
    "{text}",
    "Review: {text} It was",
    "{text} It was",
    "A movie review: {text}",
    "{text} All in all, the movie was",
    "Movie review: {text} Overall, it was",
]
VERBALIZERS = {
    "naive": {"positive": ["This is a positive review."], "negative": ["This is a negative review."]},
    "great/terrible": {"positive": ["It was great."], "negative": ["It was terrible."]},
    "good/bad words": {"positive": ["good", "great", "excellent", "wonderful"],
                       "negative": ["bad", "terrible", "awful", "boring"]},
    "movie opinions": {"positive": ["It was great.", "A wonderful, moving film.", "I loved this movie.",
                                    "Highly recommended."],
                       "negative": ["It was terrible.", "A dull, tedious film.", "I hated this movie.",
                                    "A waste of time."]},
    "critic": {"positive": ["The critic loved the film.", "A positive review of a good movie."],
               "negative": ["The critic hated the film.", "A negative review of a bad movie."]},
}


@click.command()
@click.option("--calibration", default=2000, show_default=True, help="Unlabelled training texts for the prior.")
@click.option("--out", default="bench/results/zero_shot_search.json", show_default=True)
def main(calibration, out):
    from ptbundle.builder.backbone import load_backbone
    from ptbundle.builder.hard import FeatureCache, head_logits, zero_shot_head
    from ptbundle.builder.model import use_device
    from ptbundle.builder.recipe import Recipe
    from ptbundle.runtime.data import load_mr
    from ptbundle.runtime.metrics import classification_metrics
    from ptbundle.runtime.template import Template

    use_device("CPU")
    backbone, mr, recipe = load_backbone(), load_mr(), Recipe()
    positive = mr.labels.index("positive")
    # One encoder serves every template: MindSpore keeps compiled graphs per
    # network, so a network per template would hold GBs for nothing.
    cache = FeatureCache(backbone, mr, recipe, None, log=lambda m: None)
    description_features = {}
    for verbalizer in VERBALIZERS.values():
        for label in mr.labels:
            description_features[tuple(verbalizer[label])] = cache.texts(verbalizer[label])
    rows, saved = [], {}
    for source in TEMPLATES:
        cache.template, cache.cache = Template.parse(source), {}
        dev, gold, _ = cache.split("dev")
        unlabelled = cache.sample("train", calibration, recipe.seed)
        saved[source] = unlabelled
        for name, verbalizer in VERBALIZERS.items():
            label_features = [description_features[tuple(verbalizer[label])] for label in mr.labels]
            for calibrated in (False, True):
                head = zero_shot_head(label_features, unlabelled if calibrated else None)
                predicted = head_logits(dev, head, normalize=True).argmax(-1)
                m = classification_metrics(predicted, gold, len(mr.labels))
                rows.append({"template": source, "verbalizer": name, "calibrated": calibrated,
                             "dev_accuracy": m["accuracy"], "positive_share": float((predicted == positive).mean())})
                click.echo(f"{m['accuracy']:.4f}  pos {rows[-1]['positive_share']:.2f}  "
                           f"{'calibrated' if calibrated else 'raw':<10}  {name:<15} {source}")
    rows.sort(key=lambda r: -r["dev_accuracy"])
    best = rows[0]
    click.echo("\nbest on dev: " + json.dumps(best))
    cache.template, cache.cache = Template.parse(best["template"]), {}
    unlabelled, (test, gold, _) = saved[best["template"]], cache.split("test")
    verbalizer = VERBALIZERS[best["verbalizer"]]
    label_features = [description_features[tuple(verbalizer[label])] for label in mr.labels]
    head = zero_shot_head(label_features, unlabelled if best["calibrated"] else None)
    test_accuracy = float((head_logits(test, head, normalize=True).argmax(-1) == gold).mean())
    click.echo(f"its test accuracy: {test_accuracy:.4f}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"rows": rows, "best": best, "best_test_accuracy": test_accuracy,
                                     "verbalizers": VERBALIZERS}, indent=2) + "\n")


if __name__ == "__main__":
    main()
