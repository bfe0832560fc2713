"""Training a classifier's prompt and head: `prepare` (tokenize, build the net) and `train` (fit, then score)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ptbundle.runtime.metrics import classification_metrics
from ptbundle.runtime.text import load_tokenizer, pad

from ..backbones.backbone import Backbone
from ..errors import DataError
from ..families import family_of
from ..graphs.runners import TRAIN_PAD_MULTIPLE
from ..models.classifier import PromptClassifier
from ..recipe import Recipe
from ptbundle.builder.training import checkpoint, parallel
from .checkpoint import Checkpoints
from .forward import LayerCache, Upper, encode_split, evaluate
from .init import initial_prompt
from .loop import TrainStep, classification, fit


@dataclass
class Prepared:
    """Everything training a prompt needs, made once: tokenizer, encoded splits, the net, its shape."""

    tokenizer: object
    splits: dict  # split -> (encodings, label ids)
    net: PromptClassifier
    pad_id: int
    num_labels: int


def prepare(backbone: Backbone, dataset, recipe: Recipe, template=None, label_words: dict | None = None) -> Prepared:
    """Tokenize every split as the bundle will, and build the net with its initial prompt and head.

    A decoder reads its inputs through `template` (its answer slot at the end) and starts its head from
    `label_words` (label -> words, builder.families.decoder.label_rows)."""
    tokenizer = load_tokenizer(backbone.tokenizer_path, recipe.max_length)
    splits = {name: encode_split(tokenizer, dataset, name, template) for name in ("train", "dev", "test")}
    if len(splits["train"][0]) < recipe.batch_size:
        raise DataError(f"{len(splits['train'][0])} training examples, fewer than one batch of {recipe.batch_size}"
                        f" (lower --batch-size)")
    num_labels = len(dataset.labels)
    prompt_init = initial_prompt(backbone, recipe, tokenizer, [e.text for e in dataset.train]) \
        if recipe.virtual_tokens > 0 else None
    family = family_of(backbone)
    rows = family.label_rows(backbone, tokenizer, label_words, dataset.labels)
    net = family.classifier(backbone, recipe, num_labels, prompt_init, label_rows=rows)
    return Prepared(tokenizer, splits, net, backbone.config.pad_token_id, num_labels)


def train(backbone: Backbone, dataset, recipe: Recipe, log=print, checkpoints: Checkpoints | None = None,
          template=None, label_words: dict | None = None):
    """Train; return (net with the best dev epoch's weights, curve, metrics).

    `checkpoints` (its fingerprint left empty: this fills it in from the recipe, data and backbone);
    `template`, `label_words`: a decoder's (prepare)."""
    ms.set_seed(recipe.seed)
    run = prepare(backbone, dataset, recipe, template, label_words)
    net, pad_id = run.net, run.pad_id
    train_enc, train_y = run.splits["train"]
    world = parallel.world()
    steps = len(train_enc) // (recipe.batch_size * world.size) * recipe.epochs
    if checkpoints is not None:
        checkpoints = replace(checkpoints, fingerprint=checkpoint.fingerprint(
            recipe.to_json(), backbone.sha256, [e.ids for e in train_enc], train_y.tolist()))
    caches = {}
    if net.split > 0:  # the prompt starts above layer 0: the layers below run once per text (LayerCache)
        started = time.time()
        lower = family_of(net).lower_model(net)
        # Where the lower layers run in onnxruntime (a decoder's), dev is scored through the whole net there
        # (below), so only the training texts are cached.
        splits = ("train",) if lower is not None else ("train", "dev")
        caches = {split: LayerCache(net, run.splits[split][0], pad_id, lower=lower,
                                    label=f"layers 0-{net.split - 1}, {split}") for split in splits}
        del lower
        gc.collect()
        log(f"layers 0-{net.split - 1} computed once for "
            + " and ".join(f"{len(run.splits[split][0])} {split}" for split in splits)
            + f" texts ({time.time() - started:.0f} s); training layers {net.split}-{net.layer_count - 1}")
        upper = Upper(net)
        step = TrainStep(upper, recipe, steps, world)
        batch_inputs = lambda index: [Tensor(a) for a in caches["train"].batch(index)]  # noqa: E731
        if "dev" in caches:
            dev_metrics = lambda: classification_metrics(  # noqa: E731
                caches["dev"].logits(upper, run.num_labels).argmax(-1), run.splits["dev"][1], run.num_labels)
        else:  # the whole net in onnxruntime (graphs.runners.ScratchOnnx): no MindSpore graphs per shape
            dev_metrics = lambda: evaluate(net, *run.splits["dev"], pad_id, run.num_labels)  # noqa: E731
    else:
        step = TrainStep(net, recipe, steps, world)
        batch_inputs = lambda index: [Tensor(a) for a in pad([train_enc[i] for i in index], pad_id,  # noqa: E731
                                                             TRAIN_PAD_MULTIPLE)]
        dev_metrics = lambda: evaluate(net, *run.splits["dev"], pad_id, run.num_labels)  # noqa: E731
    objective = classification(step, batch_inputs, train_y, run.num_labels, dev_metrics)
    result = fit(step, objective, [len(e.ids) for e in train_enc], recipe, net.head_state, log,
                 checkpoints=checkpoints, world=world)
    # The compiled train graphs hold GBs of buffers (see TRAIN_PAD_MULTIPLE);
    # drop them before evaluation and export compile graphs of their own.
    del step
    gc.collect()
    net.load_head_state(result.weights)
    dev = result.curve[result.best_epoch - 1]["dev"]
    if "dev" in caches:  # scored from cached layers: again through the whole net
        dev = evaluate(net, *run.splits["dev"], pad_id, run.num_labels)
    metrics = {"best_epoch": result.best_epoch, "dev": dev,
               "test": evaluate(net, *run.splits["test"], pad_id, run.num_labels),
               "train_seconds": result.seconds,
               # the median leaves out the steps that compiled a new shape
               "seconds_per_step_median": round(float(np.median(result.step_seconds)), 3),
               "steps": len(result.step_seconds)}
    if world.size > 1:
        metrics["workers"] = world.size  # each trained on --batch-size of every global batch
    return net, result.curve, metrics
