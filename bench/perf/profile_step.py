"""Where a training step's time goes: MindSpore's profiler over train steps of the default recipe.

    .venv/bin/python bench/perf/profile_step.py [--backbone DIR] [--data mr] [--batch-size 16] [--seq 32] [--steps 5]

One fixed [--batch-size, --seq] batch: the first training sentences of
--data no longer than --seq tokens, encoded and padded by the runtime's
text functions (the recipe's virtual tokens are added), a few
untimed steps to compile and warm up, then --steps steps of
`builder.train.TrainStep` under `mindspore.Profiler`.  Prints milliseconds
per step for each kernel type, the largest first, and their sum; writes
<results>/profile_step.json.  This is the profile behind
model.LayerNormInputGrad and model.gelu.
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402


def profile(backbone, dataset, batch_size: int, seq: int, steps: int, warmup: int) -> tuple:
    """(shape, [(kernel type, calls per step, ms per step)], largest first)."""
    from mindspore import Profiler, Tensor

    recipe = common.recipe(batch_size=batch_size)
    run = common.prepare(backbone, dataset, recipe)
    encodings, labels = run.splits["train"]
    step = common.TrainStep(run.net, recipe, 1000)
    rows = [i for i, e in enumerate(encodings) if len(e.ids) <= seq][:batch_size]
    if len(rows) < batch_size:
        raise SystemExit(f"fewer than {batch_size} training sentences of at most {seq} tokens: raise --seq")
    arrays = common.pad([encodings[i] for i in rows], run.pad_id, seq)
    inputs = [Tensor(a) for a in arrays] + [Tensor(np.eye(run.num_labels, dtype=np.float32)[labels[rows]])]
    for _ in range(warmup):
        step(*inputs)[0].asnumpy()
    with tempfile.TemporaryDirectory() as tmp:
        profiler = Profiler(output_path=tmp)
        for _ in range(steps):
            step(*inputs)[0].asnumpy()
        profiler.stop()
        profiler.analyse()
        table = next(Path(tmp).rglob("cpu_op_type_info_*.csv"))
        rows = list(csv.DictReader(table.open()))
    kernels = [(r["op_type"], int(r["execution_frequency(per-step)"]), float(r["total_compute_time"]) / steps)
               for r in rows]
    return list(arrays[0].shape), sorted(kernels, key=lambda k: -k[2])


@click.command()
@common.options()
@click.option("--batch-size", default=16, show_default=True)
@click.option("--seq", default=32, show_default=True, help="Text tokens per row: the batch is padded to a multiple.")
@click.option("--steps", default=5, show_default=True)
@click.option("--top", default=15, show_default=True, help="Kernel types to print.")
def main(backbone, data, smoke, results, batch_size, seq, steps, top):
    steps, warmup = (1, 1) if smoke else (steps, 3)
    bb = common.load_backbone(backbone)
    shape, kernels = profile(bb, common.load_data(data), batch_size, seq, steps, warmup)
    total = sum(ms for _, _, ms in kernels)
    click.echo(f"train step {shape} + prompt, {steps} profiled steps: {total:.0f} ms of kernels per step")
    for kind, calls, ms in kernels[:top]:
        click.echo(f"  {kind:<22}{calls:>5} calls {ms:>8.1f} ms  {ms / total:6.1%}")
    common.write_results(results, "profile_step", {
        "backbone": bb.name, "data": data, "smoke": smoke, "batch_size": batch_size, "shape": shape, "steps": steps,
        "kernel_ms_per_step": round(total, 1),
        "kernels": [{"type": k, "calls_per_step": c, "ms_per_step": round(m, 2)} for k, c, m in kernels],
        "machine": common.machine_info()})


if __name__ == "__main__":
    main()
