"""How the MR decoder's zero-shot template, label words and calibration were chosen: on dev only.

    .venv/bin/python bench/experiments/decoder_zero_shot.py [--backbone smollm2] [--calibration 1000]

A causal LM classifies by the word it would say next: the template ends
where the answer goes, and each label is the LM head's logit of its words
(builder.decoder.label_rows).  For every candidate template the dev split is
run once (the builder's FeatureCache: the final-norm state at the last
token); every label-word set is then scored on those features raw and with
each calibration on unlabelled training text:

    prior     bias = -log(mean probability of the label), pt-build's (builder.hard.lm_zero_shot_head)
    logprior  bias = -mean(log probability of the label)
Prints dev accuracy best first and the share of "positive" predictions;
writes <results>/decoder_zero_shot.json.  Test accuracy only for the
dev-best combination, after choosing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
TEMPLATES = [
    "<|im_start|>user\nIs this movie review positive or negative?\n{text}<|im_end|>\n<|im_start|>assistant\n"
    "The review is",
    "<|im_start|>user\nIs this movie review positive or negative?\n{text}<|im_end|>\n<|im_start|>assistant\n"
    "The sentiment is",
    SYSTEM + "<|im_start|>user\nIs this movie review positive or negative?\n{text}<|im_end|>\n"
    "<|im_start|>assistant\nThe review is",
    common.product("MR_DECODER_TEMPLATE"),  # the dev-best: "What is the sentiment ... The sentiment of this review is"
    "Movie review: {text}\nSentiment:",
    "{text} Overall, the movie was",
]
WORDS = {
    "positive/negative": ("positive=positive", "negative=negative"),
    "good/bad": ("positive=good", "negative=bad"),
    "great/terrible": ("positive=great", "negative=terrible"),
    "several": ("positive=positive", "positive=good", "positive=great",
                "negative=negative", "negative=bad", "negative=terrible"),
}


def calibrated(logits: np.ndarray, unlabelled: np.ndarray, how: str) -> np.ndarray:
    if how == "raw":
        return logits
    z = unlabelled - unlabelled.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    if how == "prior":
        return logits - np.log(np.exp(logp).mean(0))
    return logits - logp.mean(0)  # logprior


@click.command()
@common.options()
@click.option("--calibration", default=1000, show_default=True, help="Unlabelled training texts for the prior.")
def main(backbone, data, smoke, results, calibration):
    bb = common.load_backbone(backbone or "smollm2")
    dataset, recipe = common.load_data(data), common.recipe()
    templates, words = (TEMPLATES[:1], dict(list(WORDS.items())[:2])) if smoke else (TEMPLATES, WORDS)
    calibration = 16 if smoke else calibration
    cache = common.FeatureCache(bb, dataset, recipe, common.Template.parse(templates[0]), log=lambda m: None)
    rows_of = {name: common.label_rows(bb, cache.tokenizer, common.Verbalizer.parse(items, dataset.labels)
                                       .descriptions, dataset.labels) for name, items in words.items()}
    rows, saved = [], {}
    positive = dataset.labels.index("positive") if "positive" in dataset.labels else len(dataset.labels) - 1
    for source in templates:
        cache.template, cache.cache = common.Template.parse(source), {}
        dev, gold, _ = cache.split("dev")
        saved[source] = unlabelled = cache.sample("train", calibration, recipe.seed)
        for name, label_rows in rows_of.items():
            for how in ("raw", "prior", "logprior"):
                predicted = calibrated(dev @ label_rows.T, unlabelled @ label_rows.T, how).argmax(-1)
                m = common.metrics(predicted, gold, len(dataset.labels))
                rows.append({"template": source, "words": name, "calibration": how, "dev_accuracy": m["accuracy"],
                             "positive_share": float((predicted == positive).mean())})
                click.echo(f"{m['accuracy']:.4f}  pos {rows[-1]['positive_share']:.2f}  {how:<9} {name:<18} "
                           f"{source!r}")
    rows.sort(key=lambda r: -r["dev_accuracy"])
    best = rows[0]
    click.echo("\nbest on dev: " + json.dumps(best))
    test_accuracy = None
    if dataset.test:
        cache.template, cache.cache = common.Template.parse(best["template"]), {}
        test, gold, _ = cache.split("test")
        label_rows = rows_of[best["words"]]
        predicted = calibrated(test @ label_rows.T, saved[best["template"]] @ label_rows.T,
                               best["calibration"]).argmax(-1)
        test_accuracy = float((predicted == gold).mean())
        click.echo(f"its test accuracy: {test_accuracy:.4f}")
    common.write_results(results, "decoder_zero_shot", {
        "backbone": bb.name, "data": data, "smoke": smoke, "calibration_texts": calibration, "rows": rows,
        "best": best, "best_test_accuracy": test_accuracy, "words": {k: list(v) for k, v in words.items()}})


if __name__ == "__main__":
    main()
