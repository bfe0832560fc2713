"""PyTorch + PEFT trained until it reaches a dev accuracy: the peer's half of bench/experiments/time_to_accuracy.py.

Runs in bench/.peer-venv, as bench/peer/peer_torch.py (whose model, optimizer
and steps it uses):

    bench/.peer-venv/bin/python bench/peer/peer_time_to_accuracy.py --data DIR --target 0.7955 [--max-epochs 3] [--smoke]

DIR is what bench/peer/peer_inputs.py wrote for one prompt method: data.json
(texts, our batches of each epoch, the learning rate of every step, the
recipe: method, virtual tokens, learning rates, batch size, seed) and
init.npz (our initial prompt and head, used with --init ours).

The model is peer_torch.PeerModel (PEFT PromptTuningConfig or
PrefixTuningConfig, FEATURE_EXTRACTION over AutoModel, mean pooling over the
text, a linear head), trained by peer_torch.Trainer (AdamW, the recipe's
learning rates with linear warmup and decay over --max-epochs, weight decay
on the head only) on our batches in our order, each padded to its longest
row (--pad-multiple 1: what PyTorch runs fastest; no graphs per shape to
save).  --init peft (the default) starts where PEFT starts a user: prompt
tuning from PEFT's vocabulary-sampling init, a prefix from PEFT's N(0, 1)
table, the head from torch's Linear init, all under torch.manual_seed(0);
--init ours from our initial prompt and head.

Dev accuracy is scored after every 1/--checks-per-epoch of an epoch (4: every
quarter, about 133 steps on MR), and training stops at the first check at or
above --target, or after --max-epochs.  Time is training only: the wall
time of the steps (padding included), cumulative; each check's scoring of
dev is timed apart and reported as eval seconds.
Writes <results>/time_to_accuracy_peer_<method>.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import peer_torch  # first: it puts bench/ on sys.path, for common
from common import write_results
from peer_torch import Trainer, accuracy, frozen_check, recipe_model, run_steps, train_labels


def segments(train_batches: list, epochs: int, per_epoch: int):
    """(epoch, fraction of epochs done at its end, batches) of each stretch between two dev checks."""
    for epoch in range(epochs):
        batches = train_batches[epoch]
        bounds = [0] + [round(len(batches) * q / per_epoch) for q in range(1, per_epoch + 1)]
        for q in range(per_epoch):
            yield epoch + 1, epoch + (q + 1) / per_epoch, batches[bounds[q] : bounds[q + 1]]


def train_to(args, data: dict, tokenizer) -> dict:
    """Train until dev accuracy reaches --target (or --max-epochs); every check with its times."""
    recipe = data["recipe"]
    encodings, y = train_labels(data, tokenizer)
    model = recipe_model(data, args.attn_implementation)
    if args.init == "ours":
        model.load(dict(np.load(Path(args.data) / "init.npz")))
    trainable = frozen_check(model)
    epochs = args.max_epochs
    if epochs > len(data["train_batches"]):
        raise SystemExit(f"--max-epochs {epochs}: {args.data} has batches for {len(data['train_batches'])} epochs")
    trainer = Trainer(model, recipe, data["lr_schedules"][str(epochs)])
    steps_data = dict(data, train_pad_multiple=args.pad_multiple)
    checks, train_seconds, steps = [], 0.0, 0
    for epoch, done, batches in segments(data["train_batches"], epochs, args.checks_per_epoch):
        t = time.perf_counter()
        run = run_steps(trainer, encodings, y, batches, steps_data)
        train_seconds += time.perf_counter() - t
        steps += len(batches)
        t = time.perf_counter()
        dev = accuracy(model, tokenizer, data["dev"], data)
        checks.append({"epoch": round(done, 3), "step": steps, "train_seconds": round(train_seconds, 3),
                       "eval_seconds": round(time.perf_counter() - t, 1), "dev_accuracy": dev,
                       "train_loss": round(run["mean_loss"], 4)})
        print(f"PEFT {recipe['method']} epoch {done:.2f} (step {steps}): dev {dev:.4f}, loss {run['mean_loss']:.4f}, "
              f"training {train_seconds:.0f} s", flush=True)
        if dev >= args.target:
            break
    best = max(checks, key=lambda c: (c["dev_accuracy"], -c["train_seconds"]))  # the first check at the best
    reached = checks[-1]["dev_accuracy"] >= args.target
    return {"method": recipe["method"], "virtual_tokens": recipe["virtual_tokens"], "init": args.init,
            "target": args.target, "reached": reached,
            "seconds_to_target": checks[-1]["train_seconds"] if reached else None,
            "best_accuracy": best["dev_accuracy"], "best_seconds": best["train_seconds"], "best_epoch": best["epoch"],
            "train_seconds": checks[-1]["train_seconds"], "eval_seconds": round(sum(c["eval_seconds"] for c in checks), 1),
            "checks": checks, "max_epochs": epochs, "checks_per_epoch": args.checks_per_epoch,
            "steps_per_epoch": len(data["train_batches"][0]), "batch_size": recipe["batch_size"],
            "pad_multiple": args.pad_multiple, "trainable_parameters": trainable,
            "attn_implementation": model.attn_implementation, "recipe": recipe,
            "optimizer": "torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-6), bias-corrected"}


def main():
    p = peer_torch.arguments(__doc__.split("\n")[0])
    p.add_argument("--target", type=float, required=True, help="dev accuracy to reach (0-1)")
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--checks-per-epoch", type=int, default=4)
    p.add_argument("--init", choices=["peft", "ours"], default="peft",
                   help="PEFT's and torch's initialization (seed 0), or our initial prompt and head (init.npz)")
    p.add_argument("--pad-multiple", type=int, default=1, help="pad each training batch to a multiple of this")
    args = p.parse_args()
    if args.smoke:
        args.max_epochs, args.checks_per_epoch = 1, 2
    data, tokenizer = peer_torch.setup(args)
    result = dict(peer_torch.environment(), **train_to(args, data, tokenizer), smoke=args.smoke)
    write_results(args.results, f"time_to_accuracy_peer_{data['recipe']['method']}", result)


if __name__ == "__main__":
    main()
