"""Hard prompts: a fixed text template on the frozen encoder (or causal LM), and two heads for it.

- zero-shot: no training.  Each label is described in words ("It was
  great.", "It was terrible."); the descriptions are embedded by the same
  encoder, and the head's rows are the labels' unit centroids, so the graph
  computes cosine similarities.  A bias calibrates the label prior: on
  unlabelled training text every label gets the same mean score.
  A causal LM's zero-shot head is its LM head's rows of the label words,
  read at the template's end, calibrated the same way (lm_zero_shot_head).
- probe: the template stays fixed and only the linear head is trained, with
  the soft prompt's data, epochs, seed and head recipe.  The gap between the
  probe and the soft bundle is what the learned prompt adds.

Nothing before the head trains in either, so the encoder runs once per text:
the pooled features are computed once and both heads are fitted on them.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from mindspore import Tensor

from ptbundle.runtime.bundle import batched_logits
from ptbundle.runtime.metrics import classification_metrics
from ptbundle.runtime.onnx_backend import OnnxModel
from ptbundle.runtime.template import Template
from ptbundle.runtime.text import encode, load_tokenizer

from ..backbones.backbone import Backbone
from ..errors import BuildError
from ..families import family_of
from ..families.decoder import label_rows
from ..graphs.targets import export_onnx
from ..models.classifier import Features, HeadOnly, PromptClassifier
from ..recipe import Recipe
from .forward import cell_logits, encode_split
from .loop import TrainStep, classification, fit

# Cosine similarities of sentence embeddings differ by a few hundredths
# between labels; this scale turns them into usable probabilities.  It does
# not change which label wins.
ZERO_SHOT_SCALE = 20.0
# At most this many unlabelled training texts calibrate the zero-shot prior.
CALIBRATION_TEXTS = 2000
# A causal LM's: each text is a pass through the whole decoder (SmolLM2: 0.08 s here, 2,000 texts 2.5 min of the
# one-command build), and 1,000 calibrate as well on MR dev (mean 82.33 over 3 disjoint samples against 82.46
# for 2,000; .venv/bin/python bench/experiments/calibration_size.py).
LM_CALIBRATION_TEXTS = 1000


@dataclass(frozen=True)
class Verbalizer:
    """Label -> descriptions whose embeddings stand for the label."""

    descriptions: dict

    @classmethod
    def parse(cls, items, labels) -> "Verbalizer":
        """From "label=description" strings; a label without any is described by its own name."""
        descriptions = {label: [] for label in labels}
        for item in items:
            label, sep, text = item.partition("=")
            if not sep or not text.strip():
                raise BuildError(f"--label-text {item!r}: expected LABEL=DESCRIPTION")
            if label not in descriptions:
                raise BuildError(f"--label-text {item!r}: unknown label {label!r} (labels: {', '.join(labels)})")
            descriptions[label].append(text.strip())
        return cls({label: texts or [label] for label, texts in descriptions.items()})


def hard_classifier(backbone: Backbone, recipe: Recipe, num_labels: int, normalize: bool) -> PromptClassifier:
    """No virtual tokens: the soft prompt's classifier, frozen encoder and seeded head, reading the template."""
    family = family_of(backbone)
    if family.pooling(recipe) == "cls" and backbone.pooler_weights() is None:
        raise BuildError(f"hard prompts with cls pooling need a checkpoint with a trained pooler; "
                         f"{backbone.name} has none: use --pooling mean")
    return family.classifier(backbone, replace(recipe, virtual_tokens=0), num_labels, None, normalize)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot_head(label_features: list, unlabelled: np.ndarray | None, scale: float = ZERO_SHOT_SCALE) -> dict:
    """Head weights from description embeddings (one [k, h] array per label).

    With unlabelled features the bias calibrates the label prior; with None there is no bias.
    """
    centroids = np.stack([unit(unit(f).mean(0)) for f in label_features])
    prior = np.zeros(len(centroids)) if unlabelled is None else (unit(unlabelled) @ centroids.T).mean(0)
    return {"classifier.weight": (scale * centroids).astype(np.float32),
            "classifier.bias": (-scale * prior).astype(np.float32)}


def head_logits(features: np.ndarray, head: dict, normalize: bool) -> np.ndarray:
    """What the folded graph computes after pooling, in numpy."""
    x = unit(features) if normalize else features
    return x @ head["classifier.weight"].T + head["classifier.bias"]


@dataclass
class HardResult:
    net: PromptClassifier
    curve: list
    metrics: dict
    details: dict  # the manifest's details (the zero-shot verbalizer)
    recipe: dict  # the recipe fields that decide this bundle (the manifest records these)


class FeatureCache:
    """Pooled features of each split under the template, computed on first use.

    On CPU the encoder runs as an ONNX graph in onnxruntime, the fastest
    forward pass this project has on CPU (bench/perf/inference.py compares
    the backends; `pt-build export --prompt hard` logs each split's time);
    elsewhere MindSpore runs it on the device.
    """

    def __init__(self, backbone: Backbone, dataset, recipe: Recipe, template: Template, log, device: str = "CPU"):
        self.dataset, self.template, self.log = dataset, template, log
        self.tokenizer = load_tokenizer(backbone.tokenizer_path, recipe.max_length)
        self.pad_id = backbone.config.pad_token_id
        self.width = backbone.config.hidden_size
        net = hard_classifier(backbone, recipe, self.width, normalize=False)
        if device == "CPU":
            # An identity head makes the classifier graph output its features
            # exactly (x @ I adds only zeros), so the exporter needs no second kind of graph.
            net.load_head_state({"classifier.weight": np.eye(self.width, dtype=np.float32),
                                 "classifier.bias": np.zeros(self.width, np.float32)})
            self.scratch = tempfile.TemporaryDirectory(prefix="ptbundle-features-")
            self.model = OnnxModel(export_onnx(net, Path(self.scratch.name) / "features.onnx"))
        else:
            self.model = None
            self.features = Features(net)
        self.cache = {}

    def embed(self, encodings) -> np.ndarray:
        if self.model is not None:
            return batched_logits(self.model, encodings, self.pad_id, self.width)
        return cell_logits(self.features, encodings, self.pad_id, self.width)

    def split(self, name: str):
        """(features, gold label ids, token lengths) of a split."""
        if name not in self.cache:
            encodings, gold = encode_split(self.tokenizer, self.dataset, name, self.template)
            started = time.time()
            features = self.embed(encodings) if encodings else np.zeros((0, 1), np.float32)
            self.log(f"encoded {name} with the template: {len(encodings)} texts in {time.time() - started:.0f} s")
            self.cache[name] = (features, gold, [len(e.ids) for e in encodings])
        return self.cache[name]

    def sample(self, name: str, size: int, seed: int) -> np.ndarray:
        """Features of `size` examples of a split drawn with `seed`, labels unused."""
        examples = getattr(self.dataset, name)
        chosen = np.random.RandomState(seed).permutation(len(examples))[:size]
        if name in self.cache:
            return self.cache[name][0][chosen]
        texts = [examples[i].text for i in chosen]
        texts_b = [examples[i].text_b for i in chosen] if self.dataset.is_pair else None
        return self.embed(encode(self.tokenizer, texts, texts_b, self.template))

    def texts(self, texts) -> np.ndarray:
        """Plain texts (no template): label descriptions."""
        return self.embed(encode(self.tokenizer, texts))


def lm_zero_shot_head(rows: np.ndarray, unlabelled: np.ndarray) -> dict:
    """A causal LM's zero-shot head: its label words' logits, less the mean log-probability each label gets
    on unlabelled text, so that no label wins merely by being the word the model says more often (Zhao et
    al. 2021 calibrate with content-free inputs; this uses the task's own unlabelled text).  On MR dev with
    SmolLM2 the mean log-probability beat the log of the mean probability in 22 of 24 template and word
    choices (median +2.3 points; +0.75 on the chosen one: bench/experiments/decoder_zero_shot.py): a few
    confident rows pull a mean of probabilities up."""
    logits = unlabelled @ rows.T
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return {"classifier.weight": rows.astype(np.float32), "classifier.bias": (-logp.mean(0)).astype(np.float32)}


def build_lm_zero_shot(cache: FeatureCache, backbone: Backbone, recipe: Recipe, verbalizer: Verbalizer) -> HardResult:
    """build_zero_shot for a causal LM: the label words' rows of its LM head read the last token (the answer
    slot), calibrated on unlabelled training text; cache's features are the final-norm states there."""
    labels = cache.dataset.labels
    unlabelled = cache.sample("train", LM_CALIBRATION_TEXTS, recipe.seed)
    head = lm_zero_shot_head(label_rows(backbone, cache.tokenizer, verbalizer.descriptions, labels), unlabelled)
    net = hard_classifier(backbone, recipe, len(labels), normalize=False)
    net.load_head_state(head)
    metrics = {split: split_metrics(cache, split, head, normalize=False) for split in ("dev", "test")}
    metrics = {k: v for k, v in metrics.items() if v}
    details = {"label_words": verbalizer.descriptions, "calibration": "logprior", "calibration_texts": len(unlabelled),
               "mean_log_probability": dict(zip(labels, (-head["classifier.bias"]).round(4).tolist()))}
    recorded = {"seed": recipe.seed, "max_length": recipe.max_length}
    return HardResult(net, [], metrics, details, recorded)


def build_embedding_zero_shot(cache: FeatureCache, backbone: Backbone, recipe: Recipe,
                              verbalizer: Verbalizer) -> HardResult:
    """An encoder's zero-shot head: the label descriptions' unit centroids, cosine similarity, calibrated."""
    labels = cache.dataset.labels
    label_features = [cache.texts(verbalizer.descriptions[label]) for label in labels]
    unlabelled = cache.sample("train", CALIBRATION_TEXTS, recipe.seed)
    head = zero_shot_head(label_features, unlabelled)
    net = hard_classifier(backbone, recipe, len(labels), normalize=True)
    net.load_head_state(head)
    metrics = {split: split_metrics(cache, split, head, normalize=True) for split in ("dev", "test")}
    metrics = {k: v for k, v in metrics.items() if v}
    details = {"verbalizer": verbalizer.descriptions, "calibration_texts": len(unlabelled)}
    # Nothing is trained: only what chooses the calibration sample and the features.
    recorded = {"seed": recipe.seed, "max_length": recipe.max_length, "pooling": recipe.pooling}
    return HardResult(net, [], metrics, details, recorded)


def split_metrics(cache: FeatureCache, split: str, head: dict, normalize: bool) -> dict:
    features, gold, _ = cache.split(split)
    if len(gold) == 0:
        return {}
    predicted = head_logits(features, head, normalize).argmax(-1)
    return classification_metrics(predicted, gold, len(cache.dataset.labels))


def build_probe(cache: FeatureCache, backbone: Backbone, recipe: Recipe, log) -> HardResult:
    """Train the head alone on the cached features, as builder.training.classifier trains the soft prompt's head."""
    features, gold, lengths = cache.split("train")
    num_labels = len(cache.dataset.labels)
    if len(gold) < recipe.batch_size:
        raise BuildError(f"{len(gold)} training examples, fewer than one batch of {recipe.batch_size}")
    net = hard_classifier(backbone, recipe, num_labels, normalize=False)
    step = TrainStep(HeadOnly(net), recipe, len(gold) // recipe.batch_size * recipe.epochs)
    objective = classification(step, lambda index: [Tensor(features[index])], gold, num_labels,
                               lambda: split_metrics(cache, "dev", net.head_state(), normalize=False))
    result = fit(step, objective, lengths, recipe, net.head_state, log, name="probe epoch")
    head = result.weights
    net.load_head_state(head)
    curve = result.curve
    best_epoch = result.best_epoch
    metrics = {"best_epoch": best_epoch, "dev": curve[best_epoch - 1]["dev"], "train_seconds": result.seconds}
    test = split_metrics(cache, "test", head, normalize=False)
    if test:
        metrics["test"] = test
    # The soft prompt's head recipe; there is no prompt to initialise or train.
    recorded = {k: v for k, v in recipe.to_json().items()
                if k not in ("method", "virtual_tokens", "layer", "prefix_projection", "init", "init_text",
                             "prompt_lr")}
    return HardResult(net, curve, metrics, {}, recorded)


# A family's zero-shot head, by its Family.zero_shot: (cache, backbone, recipe, verbalizer) -> HardResult.
ZERO_SHOT = {"embedding": build_embedding_zero_shot, "lm": build_lm_zero_shot}


def build_zero_shot(cache: FeatureCache, backbone: Backbone, recipe: Recipe, verbalizer: Verbalizer) -> HardResult:
    return ZERO_SHOT[family_of(backbone).zero_shot](cache, backbone, recipe, verbalizer)


# Each head: (cache, backbone, recipe, verbalizer, log) -> HardResult.  pt-build's --head offers these.
HEADS = {"zero-shot": lambda cache, backbone, recipe, verbalizer, log: build_zero_shot(cache, backbone, recipe,
                                                                                     verbalizer),
         "probe": lambda cache, backbone, recipe, verbalizer, log: build_probe(cache, backbone, recipe, log)}
# Heads whose graph scales the pooled vector to unit length first (a bundle's manifest records the head's name).
NORMALIZED_HEADS = ("zero-shot",)
