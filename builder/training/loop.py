"""The one training loop: a compiled step, epochs of length-bucketed batches, dev after each, the best epoch kept.

Read it like nanoGPT's train.py.  `fit` drives any step that takes a batch and returns (loss, logits-or-predictions):
a classifier's prompt and head (builder.training.classifier), a head alone (builder.training.hard), or an
instruction prompt with the LM loss (builder.training.instruct).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import click
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..recipe import Recipe
from ptbundle.builder.training import checkpoint
from .checkpoint import Checkpoints, LoopState
from .parallel import World


def lr_schedule(peak: float, total: int, warmup: float) -> list:
    """Linear warmup to `peak`, then linear decay to zero."""
    warm = max(1, int(total * warmup))
    return [peak * (s + 1) / warm if s < warm else peak * max(0.0, (total - s) / max(1, total - warm))
            for s in range(total)]


def bucketed_batches(lengths, batch_size: int, rng) -> list:
    """Shuffled batches of similar length; padding then costs little.

    Sort within pools of 50 batches (not globally) so each epoch still mixes
    examples; drop the one ragged batch so every step has the same batch size
    and few shapes need compiling.
    """
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(np.asarray(lengths)[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


class TrainStep(nn.Cell):
    """One compiled step: forward, loss, gradients of the trainable params, AdamW."""

    def __init__(self, net, recipe: Recipe, steps: int, world: World = World()):
        super().__init__(auto_prefix=False)  # keep the net's parameter names
        self.net = net
        trainable = net.trainable_params()
        # By identity, not name: MindSpore renames Parameters after the cell path.
        prompt_ids = {id(p) for p in net.prompt_params().values()}
        prompt = [p for p in trainable if id(p) in prompt_ids]
        head = [p for p in trainable if id(p) not in prompt_ids]
        groups = [{"params": head, "lr": lr_schedule(recipe.head_lr, steps, recipe.warmup),
                   "weight_decay": recipe.weight_decay}]
        if prompt:
            groups.append({"params": prompt, "lr": lr_schedule(recipe.prompt_lr, steps, recipe.warmup),
                           "weight_decay": 0.0})
        self.optimizer = nn.AdamWeightDecay(groups)
        self.smoothing = recipe.label_smoothing
        self.grad_fn = ms.value_and_grad(self.loss, None, self.optimizer.parameters, has_aux=True)
        # Under msrun (builder.training.parallel): the gradients averaged over the workers before the update.
        self.parallel = world.size > 1
        if self.parallel:
            self.reducer = nn.DistributedGradReducer(self.optimizer.parameters, mean=True)

    def loss(self, *args):
        *inputs, onehot = args
        logits = self.net(*inputs)
        target = onehot * (1.0 - self.smoothing) + self.smoothing / onehot.shape[-1]
        return -(ops.log_softmax(logits, -1) * target).sum(-1).mean(), logits

    def construct(self, *args):
        """args: what the net takes (ids, mask, types; or features for a head alone), then one-hot labels."""
        (loss, logits), grads = self.grad_fn(*args)
        if self.parallel:
            grads = self.reducer(grads)
        self.optimizer(grads)
        return loss, logits


def progress(items, label: str, status):
    """click's progress bar on a terminal; in a log, a line every 10%."""
    if sys.stderr.isatty():
        with click.progressbar(items, label=label, show_eta=True, show_pos=True, width=24,
                               item_show_func=lambda _: status(), file=sys.stderr) as bar:
            yield from bar
        return
    started, total = time.time(), len(items)
    marks = {max(1, total * k // 10) for k in range(1, 11)}
    for done, item in enumerate(items, start=1):
        yield item
        if done in marks:
            elapsed = time.time() - started
            print(f"{label}: {done}/{total} {status()} [{elapsed:.0f} s, eta {elapsed / done * (total - done):.0f} s]",
                  file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Objective:
    """What `fit` trains for and how it keeps score: one batch through the step, and dev after each epoch.

    `run(index)` takes a batch (example indices), steps, and returns (summed loss, units, correct units): examples
    for a classifier, target tokens for a language model.  `dev()` scores the current weights; `score(dev)` is
    what the best epoch maximises; `describe(dev)` is its part of the epoch's log line; `accuracy` names the
    curve's training-accuracy field."""

    run: Callable
    dev: Callable
    score: Callable
    describe: Callable
    accuracy: str = "train_accuracy"


def classification(step: TrainStep, batch_inputs: Callable, labels, num_labels: int, dev_metrics: Callable) -> Objective:
    """A classifier's objective: cross-entropy on one-hot labels; dev accuracy picks the epoch.
    `batch_inputs(index)` gives the Tensors the step's net takes for those examples (token arrays for a prompt,
    features for a head alone)."""
    onehot = np.eye(num_labels, dtype=np.float32)
    labels = np.asarray(labels)

    def run(index):
        y = labels[index]
        loss, logits = step(*batch_inputs(index), Tensor(onehot[y]))
        return float(loss.asnumpy()) * len(index), len(index), int((logits.asnumpy().argmax(-1) == y).sum())

    return Objective(run, dev_metrics, lambda dev: dev["accuracy"],
                     lambda dev: f"dev acc {dev['accuracy']:.4f} macro-F1 {dev['macro_f1']:.4f}")


@dataclass
class Fit:
    """What `fit` returns: the best epoch (on dev), its weights, the curve, and the time per step."""

    best_epoch: int
    weights: dict
    curve: list
    step_seconds: list
    seconds: float


def fit(step, objective: Objective, lengths, recipe: Recipe, weights: Callable, log, name: str = "epoch",
        checkpoints: Checkpoints | None = None, world: World = World()) -> Fit:
    """The one training loop: epochs of length-bucketed batches, dev after each, the best epoch kept.

    Every prompt and head trains here: a classifier's (builder.training.classifier), a head alone
    (builder.training.hard), an instruction prompt with the LM loss (builder.training.instruct); `objective`
    says what a batch and a dev score are.  `weights()` snapshots what is trained.  The batch order is drawn
    from `recipe.seed` alone, so every kind of model trained on the same data sees the same batches.  With
    `checkpoints`, the whole state is saved every `every` steps and after each epoch, and `resume` goes on from
    the last save (builder.training.checkpoint).  In a `world` of several workers (builder.training.parallel)
    the batches are global, workers x batch_size examples, each worker training on its shard; only the leader
    logs and saves.
    """
    rng = np.random.RandomState(recipe.seed)
    global_batch = recipe.batch_size * world.size
    steps_per_epoch = len(lengths) // global_batch
    if not world.leader:
        log, checkpoints = (lambda message: None), (None if checkpoints is None else replace(checkpoints, every=-1))
    state, best, epoch_rng = LoopState(), None, None
    if checkpoints is not None and checkpoints.resume:
        state, epoch_rng, best_weights = checkpoint.load(checkpoints, step.optimizer)
        rng.set_state(epoch_rng)
        best = (state.best_epoch, best_weights) if best_weights is not None else None
        log(f"resuming {name} {state.epoch}/{recipe.epochs} after {state.steps} steps ({checkpoints.path})")
    started = time.time() - state.seconds
    for epoch in range(state.epoch, recipe.epochs + 1):
        step.set_train(True)
        epoch_rng = rng.get_state()
        batches = bucketed_batches(lengths, global_batch, rng)
        if state.batch == 0:
            state.epoch, state.loss_sum, state.seen, state.correct = epoch, 0.0, 0, 0
        stats = {}
        for index in progress(batches[state.batch :], f"{name} {epoch}/{recipe.epochs}", lambda: stats.get("text", "")):
            t0 = time.perf_counter()
            loss_sum, units, correct = objective.run(world.shard(index))
            state.step_seconds.append(time.perf_counter() - t0)
            state.loss_sum += loss_sum
            state.correct += correct
            state.seen += units
            state.batch += 1
            state.steps += 1
            stats["text"] = f"loss {state.loss_sum / state.seen:.3f} acc {state.correct / state.seen:.3f}"
            if checkpoints is not None and checkpoints.every > 0 and state.steps % checkpoints.every == 0 \
                    and state.batch < len(batches):
                state.seconds = time.time() - started
                checkpoint.save(checkpoints, step.optimizer, state, epoch_rng, best[1] if best else None)
            checkpoint.maybe_die(state.steps, world.rank)
        dev = objective.dev()
        point = {"epoch": epoch, "step": epoch * steps_per_epoch, "train_loss": state.loss_sum / max(state.seen, 1),
                 objective.accuracy: state.correct / max(state.seen, 1), "dev": dev,
                 "seconds": round(time.time() - started, 1)}
        state.curve.append(point)
        log(f"{name} {epoch}: train loss {point['train_loss']:.4f} acc {point[objective.accuracy]:.4f}, "
            f"{objective.describe(dev)} ({point['seconds']:.0f} s)")
        score = objective.score(dev)
        if state.best_dev is None or score > state.best_dev:
            state.best_dev, best = score, (epoch, weights())
            state.best_epoch = epoch
        state.epoch, state.batch = epoch + 1, 0
        if checkpoints is not None and checkpoints.every >= 0 and epoch < recipe.epochs:
            state.seconds = time.time() - started
            checkpoint.save(checkpoints, step.optimizer, state, rng.get_state(), best[1])
    return Fit(best[0], best[1], state.curve, state.step_seconds, round(time.time() - started, 1))

