"""Deep and late prompts: PEFT's prefix tuning reproduced, folded into MindIR and ONNX, and trained from cached layers."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mindspore import Tensor

from checkpoints import FIXTURES
from ptbundle.builder.backbones.backbone import load_backbone
from ptbundle.builder.models.classifier import PromptClassifier
from ptbundle.builder.models.prompts import PromptSpec
from ptbundle.builder.families.encoder import ENCODER

FIXTURE = np.load(FIXTURES / "prefix_reference.npz")
TOLERANCE = 1e-5

# case -> (checkpoint, pooling); made by fixtures/make_prefix_reference.py with PEFT's PrefixTuningConfig
CASES = {
    "tiny-bert-prefix-cls": ("bert", "cls"),
    "tiny-bert-prefix-pair": ("bert", "cls"),
    "tiny-roberta-prefix-cls": ("roberta", "cls"),
    "tiny-bert-prefix-projection": ("bert", "cls"),
    "tiny-bert-prefix-mean": ("bert", "mean"),
}


def reference(case, key):
    return FIXTURE[f"{case}/{key}"]


def inputs_of(case):
    return [reference(case, k).astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")]


def prefix_net(backbone, case, pooling, spec=None):
    prefix = reference(case, "prefix")
    spec = spec or PromptSpec.of("prefix-tuning", prefix.shape[0])
    net = PromptClassifier(ENCODER.model(backbone), prefix.shape[0], reference(case, "logits").shape[1], pooling,
                           spec=spec)
    head = {"classifier.weight": reference(case, "classifier.weight"), "classifier.bias": reference(case, "classifier.bias")}
    if pooling == "cls":
        head["pooler.weight"], head["pooler.bias"] = reference(case, "pooler.weight"), reference(case, "pooler.bias")
    if not spec.projection:
        head["prompt_embeddings"] = prefix
    net.load_head_state(head)
    net.set_train(False)
    return net


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefix_logits_match_peft(case, tiny_bert, tiny_roberta):
    family, pooling = CASES[case]
    backbone = load_backbone({"bert": tiny_bert, "roberta": tiny_roberta}[family])
    logits = prefix_net(backbone, case, pooling)(*(Tensor(a) for a in inputs_of(case))).asnumpy()
    expected = reference(case, "logits")
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zeros
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)


def test_prefix_projection_trains_peft_weights_and_folds_to_peft_table(tiny_bert):
    """Our reparameterization, given PEFT's MLP weights, computes PEFT's table; the folded net gives PEFT's logits."""
    case = "tiny-bert-prefix-projection"
    backbone = load_backbone(tiny_bert)
    mlp = {k: reference(case, f"prompt_encoder.{k}") for k in
           ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")}
    spec = PromptSpec.of("prefix-tuning", 3, projection=mlp["transform.0.weight"].shape[0])
    net = prefix_net(backbone, case, "cls", spec)
    net.load_head_state({"prefix.embedding": mlp["embedding.weight"], "prefix.up.weight": mlp["transform.0.weight"],
                         "prefix.up.bias": mlp["transform.0.bias"], "prefix.down.weight": mlp["transform.2.weight"],
                         "prefix.down.bias": mlp["transform.2.bias"]})
    np.testing.assert_allclose(net.folded_state()["prompt_embeddings"], reference(case, "prefix"), atol=1e-5)
    folded = net.folded()
    assert folded.spec.projection == 0 and set(folded.head_params()) == {
        "prompt_embeddings", "pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias"}
    arrays = [Tensor(a) for a in inputs_of(case)]
    for model in (net, folded):
        np.testing.assert_allclose(model(*arrays).asnumpy(), reference(case, "logits"), atol=TOLERANCE, rtol=0)


SPECS = {
    "prefix": PromptSpec.of("prefix-tuning", 3),
    "prefix-from-1": PromptSpec.of("prefix-tuning", 3, layer=1),
    "late-1": PromptSpec.of("late-prompt", 3, layer=1),
}


def random_net(backbone, spec, pooling="mean", seed=0):
    net = PromptClassifier(ENCODER.model(backbone), spec.virtual_tokens, 2, pooling, spec=spec)
    rng = np.random.RandomState(seed)
    net.load_head_state({k: rng.normal(0, 0.5, v.shape) for k, v in net.head_state().items()
                         if k not in ("pooler.weight", "pooler.bias")})
    net.set_train(False)
    return net


@pytest.mark.parametrize("name", sorted(SPECS))
def test_cached_lower_layers_give_the_whole_pass(name, tiny_bert):
    """Training from LayerCache (the layers below the prompt run once per text) computes what the whole net does."""
    from ptbundle.builder.training.forward import LayerCache, Upper
    from ptbundle.runtime.text import encode, load_tokenizer, pad

    backbone = load_backbone(tiny_bert)
    net = random_net(backbone, SPECS[name])
    texts = ["a great movie", "the worst film ever , boring acting and a weak story", "dull", "the best script"]
    encodings = encode(load_tokenizer(backbone.tokenizer_path, 128), texts)
    whole = net(*(Tensor(a) for a in pad(encodings, 0))).asnumpy()
    cached = LayerCache(net, encodings, 0, batch_size=2).logits(Upper(net), 2, batch_size=3)
    assert net.split == SPECS[name].layer
    np.testing.assert_allclose(cached, whole, atol=1e-5, rtol=0)
    on_disk = LayerCache(net, encodings, 0, batch_size=2, memory_limit=0)  # a corpus too large for memory
    assert isinstance(on_disk.table, np.memmap)
    np.testing.assert_array_equal(on_disk.logits(Upper(net), 2, batch_size=3), cached)


def test_initial_activations_are_the_encoders_own(tiny_bert):
    """The numpy pass that starts a prefix or late prompt from real tokens agrees with the MindSpore encoder."""
    from ptbundle.builder.training.forward import Lower
    from ptbundle.builder.families import family_of

    backbone = load_backbone(tiny_bert)
    ids = [10, 20, 30, 11]
    states, keys_values = family_of(backbone).token_activations(backbone, ids)
    net = random_net(backbone, PromptSpec.of("late-prompt", 2, layer=1))
    arrays = [np.array([ids], np.int32), np.ones((1, 4), np.int32), np.zeros((1, 4), np.int32)]
    lower = Lower(net)(*(Tensor(a) for a in arrays)).asnumpy()[0]
    np.testing.assert_allclose(states[1], lower, atol=1e-4)
    assert len(keys_values) == 2 and keys_values[0].shape == (4, 64)
    # layer 0's keys: the embedding output times the key block of the fused QKV weight
    w = backbone.parameters()
    keys = states[0] @ w["layers.0.attention.qkv.weight"][32:64].T + w["layers.0.attention.qkv.bias"][32:64]
    np.testing.assert_allclose(keys_values[0][:, :32], keys, atol=1e-4)


@pytest.mark.parametrize("options", [
    ["--method", "prefix-tuning", "--layer", "1"],
    ["--method", "late-prompt", "--layer", "1"],
    ["--method", "prefix-tuning", "--prefix-projection", "8"],
])
def test_deep_and_late_bundles_build_and_serve(options, tiny_bert, toy_files, tmp_path):
    """The real pt-build trains each method, folds it, checks MindIR and ONNX against it, and pt-run serves it."""
    from ptbundle.builder.cli import cli
    from ptbundle.runtime import Bundle

    train, dev = toy_files
    result = CliRunner().invoke(cli, ["export", "--prompt", "soft", "--train", str(train), "--dev", str(dev),
                                      "--backbone", str(tiny_bert), "--virtual-tokens", "4", "--epochs", "2",
                                      "--batch-size", "8", "--prompt-lr", "0.05", "--head-lr", "0.05",
                                      "--out", str(tmp_path), "--name", "toy", *options])
    assert result.exit_code == 0, result.output + repr(result.exception)
    manifest = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    task = manifest["tasks"][0]
    assert task["prompt_method"] == options[1] and task["num_virtual_tokens"] == 4
    assert manifest["export"]["mindir"] <= 1e-5 and manifest["export"]["onnx"] <= 1e-4
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "toy" / "prompt.safetensors"))
    width = {"prefix-tuning": 2 * 2 * 32 // (2 if "--layer" in options else 1), "late-prompt": 32}[options[1]]
    assert saved["prompt_embeddings"].shape == (4, width) and not any(k.startswith("prefix.") for k in saved)
    texts = ["a great movie", "the worst film ever", "boring acting and a weak story"]
    onnx_probs = [p.probabilities for p in Bundle.load(tmp_path / "toy").predict(texts)]
    mindir_probs = [p.probabilities for p in Bundle.load(tmp_path / "toy", backend="mindspore").predict(texts)]
    for a, b in zip(onnx_probs, mindir_probs):
        assert all(abs(a[k] - b[k]) < 1e-4 for k in a)


@pytest.mark.parametrize("options, message", [
    (["--method", "late-prompt"], "--method late-prompt enters at --layer 1 or above"),
    (["--method", "prefix-tuning", "--layer", "7"], "--layer 7"),
    (["--method", "late-prompt", "--prefix-projection", "8", "--layer", "1"], "--prefix-projection is for"),
    (["--method", "prompt-tuning", "--layer", "1"], "--layer is for prefix-tuning and late-prompt"),
])
def test_bad_prompt_recipes_are_one_line(options, message, tiny_bert, toy_files, tmp_path):
    from ptbundle.builder.cli import cli

    train, dev = toy_files
    result = CliRunner().invoke(cli, ["export", "--prompt", "soft", "--train", str(train), "--dev", str(dev),
                                      "--backbone", str(tiny_bert), "--out", str(tmp_path), *options])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())  # nothing half-written
