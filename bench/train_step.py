"""Seconds per training step on MR, default backbone and recipe.

    .venv/bin/python bench/train_step.py [--batch-size 32] [--steps 30]

Runs --steps real train steps on length-bucketed MR training batches (the
batches an epoch would use, in its order), after one warm-up step per shape
so that graph compilation is reported apart.  Prints min/median/max and the
projected epoch time, and writes bench/results/train_step.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click
import numpy as np


@click.command()
@click.option("--batch-size", default=32, show_default=True)
@click.option("--steps", default=30, show_default=True)
@click.option("--out", default="bench/results/train_step.json", show_default=True)
def main(batch_size, steps, out):
    from mindspore import Tensor

    from ptbundle.builder.backbone import load_backbone
    from ptbundle.builder.data import load_mr
    from ptbundle.builder.model import use_device
    from ptbundle.builder.recipe import Recipe
    from ptbundle.builder.train import (TRAIN_PAD_MULTIPLE, TrainStep, bucketed_batches, build_classifier,
                                        encode_split, initial_prompt)
    from ptbundle.runtime.text import load_tokenizer, pad

    use_device("CPU")
    recipe = Recipe(batch_size=batch_size)
    backbone, mr = load_backbone(), load_mr()
    tokenizer = load_tokenizer(backbone.tokenizer_path, recipe.max_length)
    encodings, labels = encode_split(tokenizer, mr, "train")
    net = build_classifier(backbone, recipe, 2, initial_prompt(backbone, recipe, tokenizer, [e.text for e in mr.train]))
    batches = bucketed_batches([len(e.ids) for e in encodings], batch_size, np.random.RandomState(0))
    step = TrainStep(net, recipe, len(batches))
    onehot = np.eye(2, dtype=np.float32)
    compiled, compile_seconds, seconds, tokens = set(), [], [], []
    for index in batches:
        arrays = pad([encodings[i] for i in index], backbone.config.pad_token_id, TRAIN_PAD_MULTIPLE)
        inputs = [Tensor(a) for a in arrays] + [Tensor(onehot[labels[index]])]
        t = time.perf_counter()
        step(*inputs)[0].asnumpy()
        elapsed = time.perf_counter() - t
        if arrays[0].shape not in compiled:
            compiled.add(arrays[0].shape)
            compile_seconds.append(elapsed)
            continue
        seconds.append(elapsed)
        tokens.append(arrays[0].size + batch_size * recipe.virtual_tokens)
        if len(seconds) == steps:
            break
    median = statistics.median(seconds)
    result = {"batch_size": batch_size, "steps": len(seconds), "virtual_tokens": recipe.virtual_tokens,
              "seconds_per_step": {"min": round(min(seconds), 3), "median": round(median, 3), "max": round(max(seconds), 3)},
              "mean_tokens_per_step": round(float(np.mean(tokens)), 1),
              "projected_epoch_seconds": round(median * len(batches), 1), "steps_per_epoch": len(batches),
              "first_step_per_shape_seconds": [round(s, 2) for s in compile_seconds]}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"batch {batch_size}: median {median:.3f} s/step (min {min(seconds):.3f}, max {max(seconds):.3f}, "
               f"{len(seconds)} steps, {result['mean_tokens_per_step']:.0f} tokens/step incl. prompt); "
               f"epoch of {len(batches)} steps ~{median * len(batches):.0f} s; "
               f"{len(compile_seconds)} shapes compiled in {sum(compile_seconds):.0f} s -> {out}")


if __name__ == "__main__":
    main()
