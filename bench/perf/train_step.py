"""Seconds per training step of the default recipe on --data's training split.

    .venv/bin/python bench/perf/train_step.py [--backbone DIR] [--data mr] [--batch-size 16] [--steps 30]

Runs --steps real train steps on the batches the first epoch of
`builder.train` would use, in its order (the net from `builder.train.prepare`,
its `TrainStep`, its length-bucketed batches padded by `runtime.text.pad`),
after one warm-up step per shape so that graph compilation is reported
apart.  Prints min/median/max and the projected epoch time, and writes
<results>/train_step.json.  bench/run.py runs it in a process of its own
(MindSpore keeps GBs of buffers per compiled train graph).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402
import roofline  # noqa: E402


def measure(backbone, dataset, batch_size: int | None, steps: int, virtual_tokens: int | None) -> dict:
    """Time `steps` train steps (compiling steps excluded) of the default recipe with a shallow prompt."""
    import mindspore as ms
    from mindspore import Tensor

    # A shallow prompt, as the peer's step trains (peer_inputs): the two steps compare like with like.
    recipe = common.recipe(batch_size=batch_size, virtual_tokens=virtual_tokens, method="prompt-tuning")
    run = common.prepare(backbone, dataset, recipe)
    encodings, labels = run.splits["train"]
    batches = common.epoch_batches([len(e.ids) for e in encodings], recipe.batch_size, recipe.seed)[0]
    step = common.TrainStep(run.net, recipe, len(batches))
    onehot = np.eye(run.num_labels, dtype=np.float32)
    multiple = common.TRAIN_PAD_MULTIPLE
    prompt_rows = roofline.PromptShape.of_recipe(recipe).top_rows  # states a prompt adds before the text
    compiled, compile_seconds, seconds, tokens = set(), [], [], []
    for index in batches:
        arrays = common.pad([encodings[i] for i in index], run.pad_id, multiple)
        inputs = [Tensor(a) for a in arrays] + [Tensor(onehot[labels[index]])]
        t = time.perf_counter()
        step(*inputs)[0].asnumpy()
        elapsed = time.perf_counter() - t
        if arrays[0].shape not in compiled:
            compiled.add(arrays[0].shape)
            compile_seconds.append(elapsed)
            continue
        seconds.append(elapsed)
        tokens.append(arrays[0].size + recipe.batch_size * prompt_rows)
        if len(seconds) == steps:
            break
    if not seconds:
        raise SystemExit(f"{len(batches)} batches, each the first of its shape: no step left to time")
    median = statistics.median(seconds)
    return {"batch_size": recipe.batch_size, "steps": len(seconds), "method": recipe.method,
            "virtual_tokens": recipe.virtual_tokens,
            "recipe": recipe.to_json(), "pad_multiple": multiple,
            "seconds_per_step": common.spread(seconds),
            "mean_tokens_per_step": round(float(np.mean(tokens)), 1),
            "projected_epoch_seconds": round(median * len(batches), 1), "steps_per_epoch": len(batches),
            "projected_epoch_seconds_range": {k: round(v * len(batches), 1)
                                              for k, v in common.spread(seconds).items()},
            "first_step_per_shape_seconds": [round(s, 2) for s in compile_seconds],
            "threads": {"mindspore_runtime_num_threads": ms.get_context("runtime_num_threads"),
                        "usable_cores": common.cpu_threads()},
            "versions": {"mindspore": ms.__version__, "numpy": np.__version__}, "machine": common.machine_info()}


@click.command()
@common.options()
@click.option("--batch-size", default=None, type=int, help="[default: the recipe's]")
@click.option("--steps", default=30, show_default=True)
@click.option("--virtual-tokens", default=None, type=int, help="Override the recipe's prompt length.")
def main(backbone, data, smoke, results, batch_size, steps, virtual_tokens):
    steps = 2 if smoke else steps
    bb = common.load_backbone(backbone)
    result = measure(bb, common.load_data(data), batch_size, steps, virtual_tokens)
    result.update(backbone=bb.name, data=data, smoke=smoke)
    s, compile_seconds = result["seconds_per_step"], result["first_step_per_shape_seconds"]
    click.echo(f"batch {result['batch_size']}: median {s['median']:.3f} s/step (min {s['min']:.3f}, max {s['max']:.3f}, "
               f"{result['steps']} steps, {result['mean_tokens_per_step']:.0f} tokens/step incl. prompt); "
               f"epoch of {result['steps_per_epoch']} steps ~{result['projected_epoch_seconds']:.0f} s; "
               f"{len(compile_seconds)} shapes compiled in {sum(compile_seconds):.0f} s")
    common.write_results(results, "train_step", result)


if __name__ == "__main__":
    main()
