"""Seconds per training step on MR, default backbone and recipe.

    .venv/bin/python bench/train_step.py [--batch-size 32] [--steps 30]

Runs --steps real train steps on length-bucketed MR training batches (the
batches an epoch would use, in its order), after one warm-up step per shape
so that graph compilation is reported apart.  Prints min/median/max and the
projected epoch time, and writes bench/results/train_step.json.
`measure()` does the work; bench/run.py calls this script in a process of
its own (MindSpore keeps GBs of buffers per compiled train graph).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click
import numpy as np

from common import cpu_threads, machine_info, spread
from ptbundle.runtime.data import load_mr


def measure(batch_size: int = 16, steps: int = 30, virtual_tokens: int | None = None) -> dict:
    """Time `steps` train steps (compiling steps excluded) of the default recipe on MR."""
    import mindspore as ms
    from mindspore import Tensor

    from ptbundle.builder.backbone import load_backbone
    from ptbundle.builder.model import use_device
    from ptbundle.builder.recipe import Recipe
    from ptbundle.builder.train import (TRAIN_PAD_MULTIPLE, TrainStep, bucketed_batches, build_classifier,
                                        encode_split, initial_prompt)
    from ptbundle.runtime.text import load_tokenizer, pad

    use_device("CPU")
    recipe = Recipe(batch_size=batch_size)
    if virtual_tokens is not None:
        recipe = Recipe(batch_size=batch_size, virtual_tokens=virtual_tokens)
    backbone, mr = load_backbone(), load_mr()
    tokenizer = load_tokenizer(backbone.tokenizer_path, recipe.max_length)
    encodings, labels = encode_split(tokenizer, mr, "train")
    net = build_classifier(backbone, recipe, 2, initial_prompt(backbone, recipe, tokenizer, [e.text for e in mr.train]))
    # The first epoch's batches, as train() makes them (its rng is RandomState(seed), seed 0).
    batches = bucketed_batches([len(e.ids) for e in encodings], batch_size, np.random.RandomState(recipe.seed))
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
    return {"batch_size": batch_size, "steps": len(seconds), "virtual_tokens": recipe.virtual_tokens,
            "recipe": recipe.__dict__, "pad_multiple": TRAIN_PAD_MULTIPLE,
            "seconds_per_step": spread(seconds),
            "mean_tokens_per_step": round(float(np.mean(tokens)), 1),
            "projected_epoch_seconds": round(median * len(batches), 1), "steps_per_epoch": len(batches),
            "projected_epoch_seconds_range": {k: round(v * len(batches), 1) for k, v in spread(seconds).items()},
            "first_step_per_shape_seconds": [round(s, 2) for s in compile_seconds],
            "threads": {"mindspore_runtime_num_threads": ms.get_context("runtime_num_threads"),
                        "usable_cores": cpu_threads()},
            "versions": {"mindspore": ms.__version__, "numpy": np.__version__}, "machine": machine_info()}


@click.command()
@click.option("--batch-size", default=32, show_default=True)
@click.option("--steps", default=30, show_default=True)
@click.option("--virtual-tokens", default=None, type=int, help="Override the recipe's prompt length.")
@click.option("--out", default="bench/results/train_step.json", show_default=True)
def main(batch_size, steps, virtual_tokens, out):
    result = measure(batch_size, steps, virtual_tokens)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    s, compile_seconds = result["seconds_per_step"], result["first_step_per_shape_seconds"]
    click.echo(f"batch {batch_size}: median {s['median']:.3f} s/step (min {s['min']:.3f}, max {s['max']:.3f}, "
               f"{result['steps']} steps, {result['mean_tokens_per_step']:.0f} tokens/step incl. prompt); "
               f"epoch of {result['steps_per_epoch']} steps ~{result['projected_epoch_seconds']:.0f} s; "
               f"{len(compile_seconds)} shapes compiled in {sum(compile_seconds):.0f} s -> {out}")


if __name__ == "__main__":
    main()
