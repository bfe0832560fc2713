"""The registries' names, as pt-build offers them, and what each entry must provide."""

import numpy as np
import pytest

from ptbundle.builder import recipe
from ptbundle.builder.models import pooling, prompts
from ptbundle.builder.training import hard
from ptbundle.builder.backbones.backbone import load_backbone
from ptbundle.builder.graphs.targets import TARGETS
from ptbundle.builder.models.classifier import PromptClassifier
from ptbundle.builder.training.loop import TrainStep
from ptbundle.runtime import backends
from ptbundle.runtime.format import DECODER_GRAPHS, GRAPHS
from ptbundle.builder.cli import cli as build_cli
from ptbundle.builder.errors import RecipeError
from ptbundle.builder.families.encoder import ENCODER


def test_option_choices_are_the_registries_names():
    """pt-build offers what the registries hold (no list kept beside them), and Recipe checks against them."""
    options = {p.name: p for p in build_cli.commands["export"].params}
    assert tuple(options["method"].type.choices) == tuple(m for m in prompts.PROMPTS if m != "none")
    assert tuple(options["pooling"].type.choices) == tuple(pooling.POOLING)
    assert tuple(options["hard_head"].type.choices) == tuple(hard.HEADS)
    with pytest.raises(RecipeError, match="--method 'shallow': choose one of prompt-tuning, prefix-tuning"):
        recipe.Recipe(method="shallow")


def test_capabilities_live_on_the_prompt_methods():
    """Which methods a decoder takes, merge folds and PEFT holds: attributes of the registered kinds."""
    assert [m for m, k in prompts.PROMPTS.items() if k.decoders] == ["none", "prompt-tuning", "prefix-tuning"]
    assert {m: k.table_role for m, k in prompts.PROMPTS.items()} == {
        "none": "", "prompt-tuning": "embedded", "prefix-tuning": "past", "late-prompt": "entered"}
    assert prompts.PromptMethod.table_role is None  # a method registered later merges once it says where it sits
    assert {m: k.peft_type for m, k in prompts.PROMPTS.items()} == {
        "none": None, "prompt-tuning": "PROMPT_TUNING", "prefix-tuning": "PREFIX_TUNING", "late-prompt": None}


def test_every_graph_file_has_a_target_that_writes_it_and_a_backend_that_runs_it():
    written = {t.file for t in TARGETS.values()} | {GRAPHS["onnx-int8"]}  # int8: quantize.quantize_int8
    assert written == set(GRAPHS.values())
    assert {f for b in backends.BACKENDS.values() for f in b.files.values()} == set(GRAPHS.values())
    # a generation bundle's decoders (builder.generation writes each)
    assert {f for b in backends.BACKENDS.values() for f in b.decoders.values()} == set(DECODER_GRAPHS.values())


def test_the_prompt_trains_at_its_own_rate_without_decay(tiny_bert):
    """MindSpore renames Parameters after their cell path: the optimizer groups must not depend on names."""
    net = PromptClassifier(ENCODER.model(load_backbone(tiny_bert)), 4, 2, "mean")
    for p in net.encoder.get_parameters():
        p.requires_grad = False
    step = TrainStep(net, recipe.Recipe(prompt_lr=0.5, head_lr=0.001, weight_decay=0.1), steps=10)
    opt = step.optimizer
    decay = dict(zip([p.name for p in opt.parameters], [float(w.asnumpy()) for w in opt.weight_decay]))
    prompt_name = net.prompt.params()["prompt_embeddings"].name
    assert decay[prompt_name] == 0.0
    assert decay["classifier.weight"] == np.float32(0.1)
    peak = {p.name: max(float(v) for v in lr.learning_rate.asnumpy()) for p, lr in zip(opt.parameters, opt.learning_rate)}
    assert peak[prompt_name] == np.float32(0.5) and peak["classifier.weight"] == np.float32(0.001)
