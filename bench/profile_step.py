"""Where a training step's time goes: MindSpore's profiler over train steps of the default recipe.

    .venv/bin/python bench/profile_step.py [--batch-size 16] [--seq 32] [--steps 5]

One fixed [batch, seq] batch of random word ids (plus the recipe's virtual
tokens), a few untimed steps to compile and warm up, then --steps steps under
`mindspore.Profiler`.  Prints milliseconds per step for each kernel type, the
largest first, and their sum; writes bench/results/profile_step.json.  This
is the profile behind model.LayerNormInputGrad and model.gelu.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import click
import numpy as np

from common import machine_info


def profile(batch_size: int, seq: int, steps: int) -> list:
    """[(kernel type, calls per step, ms per step)], largest first."""
    from mindspore import Profiler, Tensor

    from ptbundle.builder.backbone import load_backbone
    from ptbundle.builder.model import use_device
    from ptbundle.builder.recipe import Recipe
    from ptbundle.builder.train import TrainStep, build_classifier

    use_device("CPU")
    recipe, backbone = Recipe(batch_size=batch_size), load_backbone()
    rng = np.random.RandomState(0)
    prompt = rng.normal(0, 0.05, (recipe.virtual_tokens, backbone.config.hidden_size)).astype(np.float32)
    step = TrainStep(build_classifier(backbone, recipe, 2, prompt), recipe, 1000)
    ids = rng.randint(1000, backbone.config.vocab_size, (batch_size, seq)).astype(np.int32)
    inputs = [Tensor(ids), Tensor(np.ones_like(ids)), Tensor(np.zeros_like(ids)),
              Tensor(np.eye(2, dtype=np.float32)[np.arange(batch_size) % 2])]
    for _ in range(3):
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
    return sorted(kernels, key=lambda k: -k[2])


@click.command()
@click.option("--batch-size", default=16, show_default=True)
@click.option("--seq", default=32, show_default=True, help="Text tokens per row (the prompt's are added).")
@click.option("--steps", default=5, show_default=True)
@click.option("--top", default=15, show_default=True, help="Kernel types to print.")
@click.option("--out", default="bench/results/profile_step.json", show_default=True)
def main(batch_size, seq, steps, top, out):
    kernels = profile(batch_size, seq, steps)
    total = sum(ms for _, _, ms in kernels)
    click.echo(f"train step [{batch_size}, {seq} + prompt], {steps} profiled steps: {total:.0f} ms of kernels per step")
    for kind, calls, ms in kernels[:top]:
        click.echo(f"  {kind:<22}{calls:>5} calls {ms:>8.1f} ms  {ms / total:6.1%}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"batch_size": batch_size, "seq": seq, "steps": steps,
                                     "kernel_ms_per_step": round(total, 1),
                                     "kernels": [{"type": k, "calls_per_step": c, "ms_per_step": round(m, 2)}
                                                 for k, c, m in kernels],
                                     "machine": machine_info()}, indent=2) + "\n")
    click.echo(f"-> {out}")


if __name__ == "__main__":
    main()
