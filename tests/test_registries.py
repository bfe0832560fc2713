"""The registries' names, as pt-build offers them, and what each entry must provide."""

import numpy as np

from ptbundle.builder import hard, pooling, prompts, recipe
from ptbundle.builder.backbone import load_backbone
from ptbundle.builder.export import TARGETS
from ptbundle.builder.model import PromptClassifier
from ptbundle.builder.train import TrainStep
from ptbundle.runtime import backends
from ptbundle.runtime.format import DECODER_GRAPHS, GRAPHS


def test_option_names_match_the_registries():
    # recipe.py lists them so that pt-build checks options before importing MindSpore
    assert recipe.POOLINGS == tuple(pooling.POOLING)
    assert recipe.HARD_HEADS == tuple(hard.HEADS)
    assert ("none",) + recipe.PROMPT_METHODS == tuple(prompts.PROMPTS)


def test_every_graph_file_has_a_target_that_writes_it_and_a_backend_that_runs_it():
    written = {t.file for t in TARGETS.values()} | {GRAPHS["onnx-int8"]}  # int8: quantize.quantize_int8
    assert written == set(GRAPHS.values())
    assert {f for b in backends.BACKENDS.values() for f in b.files.values()} == set(GRAPHS.values())
    # a generation bundle's decoders (builder.generation writes each)
    assert {f for b in backends.BACKENDS.values() for f in b.decoders.values()} == set(DECODER_GRAPHS.values())


def test_the_prompt_trains_at_its_own_rate_without_decay(tiny_bert):
    """MindSpore renames Parameters after their cell path: the optimizer groups must not depend on names."""
    net = PromptClassifier(load_backbone(tiny_bert).build_encoder(), 4, 2, "mean")
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
