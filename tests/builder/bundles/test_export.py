"""Export: the MindIR reloads with the trained model's logits; bundles are whole or absent."""

import json
import os

import numpy as np
import pytest
from mindspore import Tensor
from safetensors.numpy import load_file

from ptbundle.builder.errors import ExportError
from ptbundle.builder.backbones.backbone import load_backbone
from ptbundle.builder.bundles.classifier import write_bundle
from ptbundle.builder.models.classifier import PromptClassifier
from ptbundle.builder.models.prompts import PromptSpec
from ptbundle.runtime import Bundle, BundleError
from ptbundle.runtime.format import Manifest, sha256_file
from ptbundle.runtime.data import read_examples
from ptbundle.runtime.evaluate import score
from ptbundle.runtime.mindspore_backend import MindSporeModel
from ptbundle.runtime.text import encode, load_tokenizer, pad
from ptbundle.builder.families.encoder import ENCODER
from checkpoints import random_head

BUNDLE_FILES = {"manifest.json", "model.mindir", "model.onnx", "model.int8.onnx", "tokenizer.json",
                "prompt.safetensors", "training_log.json"}


def trained_like_net(backbone, pooling="mean", virtual_tokens=4):
    net = PromptClassifier(ENCODER.model(backbone), virtual_tokens, 3, pooling)
    head = random_head(32, virtual_tokens, 3, seed=2)
    if pooling == "mean":
        head.pop("pooler.weight"), head.pop("pooler.bias")
    net.load_head_state(head)
    return net


def minimal_manifest(backbone):
    from ptbundle.builder.bundles.manifest import base_manifest
    from ptbundle.builder.recipe import Recipe
    from ptbundle.runtime.data import Dataset, Example

    dataset = Dataset("abc", ("a", "b", "c"), [Example("x", "a")], [], [])
    return base_manifest(dataset, backbone, Recipe(max_length=64), "CPU", "mean", kind="soft", head="linear",
                         prompt_method="prompt-tuning", num_virtual_tokens=4)


@pytest.mark.parametrize("family, pooling", [("bert", "mean"), ("bert", "cls"), ("roberta", "cls")])
def test_reloaded_mindir_matches_in_memory_model(tmp_path, tiny_bert, tiny_roberta, family, pooling):
    backbone = load_backbone(tiny_bert if family == "bert" else tiny_roberta)
    net = trained_like_net(backbone, pooling)
    write_bundle(tmp_path / "b", net, backbone, minimal_manifest(backbone), curve=[])
    graph = MindSporeModel(tmp_path / "b" / "model.mindir", "CPU")
    rng = np.random.RandomState(0)
    for batch, seq in [(1, 5), (2, 17), (7, 32), (16, 64)]:  # shapes never seen at export
        ids = rng.randint(5, backbone.config.vocab_size, (batch, seq)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[0, seq // 2:] = 0  # a padded row
        types = np.zeros_like(ids)
        expected = net(Tensor(ids), Tensor(mask), Tensor(types)).asnumpy()
        np.testing.assert_allclose(graph(ids, mask, types), expected, atol=1e-5, rtol=0)


def test_bundle_files_manifest_and_prompt(tiny_bundle, toy_files):
    # the default recipe (a prefix, mean pooling) carries its PEFT adapter: a FEATURE_EXTRACTION prefix + its head,
    # and (built with --quantize int8) the calibration ranges a merge's int8 graph needs
    peft = {"peft/adapter_config.json", "peft/adapter_model.safetensors", "peft/head.safetensors",
            "peft/ptbundle_calibration.json"}
    assert {p.name for p in tiny_bundle.iterdir()} == BUNDLE_FILES | {"peft"}
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert set(m["files"]) == BUNDLE_FILES - {"manifest.json"} | peft
    for name, digest in m["files"].items():
        assert sha256_file(tiny_bundle / name) == digest
    assert len(m["tasks"]) == 1 and m["format_version"] == 3
    t = m["tasks"][0]
    assert t["labels"] == ["neg", "pos"] and t["num_virtual_tokens"] == 4 and t["pooling"] == "mean"
    assert set(m["export"]) == {"mindir", "onnx"}  # each target's measured parity is recorded
    assert m["signature"]["inputs"]["input_ids"] == {"dtype": "int32", "axes": ["batch", "seq"]}
    assert Manifest.read(tiny_bundle).to_json() == m  # what is written reads back unchanged
    # the recorded accuracies are those of the graphs in the bundle (the build's dev and test file are one)
    examples = read_examples(toy_files[1])
    for int8, metrics in ((False, t["metrics"]), (True, t["metrics"]["int8"])):
        scored = score(Bundle.load(tiny_bundle, int8=int8), examples)
        for split in ("dev", "test"):
            assert metrics[split]["n"] == 24
            assert metrics[split]["accuracy"] == pytest.approx(scored["accuracy"])
    assert t["recipe"]["seed"] == 0 and m["backbone"]["model_type"] == "bert"
    tensors = load_file(str(tiny_bundle / "prompt.safetensors"))
    assert tensors["prompt_embeddings"].shape == (4, 2 * 2 * 32)  # a prefix: keys and values of 2 layers
    assert t["prompt_method"] == "prefix-tuning" and t["details"]["first_layer"] == 0
    assert tensors["classifier.weight"].shape == (2, 32)
    curve = json.loads((tiny_bundle / "training_log.json").read_text())
    assert [p["epoch"] for p in curve] == [1, 2]


def test_runtime_predictions_equal_the_training_graph(tiny_bundle, toy_files, tiny_bert):
    """What Bundle.predict returns is what the trained net computes, in input order."""
    bundle = Bundle.load(tiny_bundle)
    texts = [line.split("\t")[0] for line in toy_files[1].read_text().splitlines()[1:]]
    logits = bundle.logits(texts, batch_size=5)
    backbone = load_backbone(tiny_bert)
    net = PromptClassifier(ENCODER.model(backbone), 4, 2, "mean", spec=PromptSpec.of("prefix-tuning", 4))  # the default
    net.load_head_state(load_file(str(tiny_bundle / "prompt.safetensors")))
    tokenizer = load_tokenizer(tiny_bundle / "tokenizer.json", 128)
    for i, text in enumerate(texts):  # one at a time: no batching, no sorting
        arrays = pad(encode(tokenizer, [text]), 0)
        np.testing.assert_allclose(logits[i], net(*(Tensor(a) for a in arrays)).asnumpy()[0], atol=1e-5)
    # batches in input order (padded more) give the same logits
    np.testing.assert_allclose(bundle.logits(texts, batch_size=5, sort_by_length=False), logits, atol=1e-5)
    predictions = bundle.predict(texts)
    assert [p.label for p in predictions] == [bundle.labels[i] for i in logits.argmax(-1)]
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-5 for p in predictions)


def test_backends_agree(tiny_bundle):
    texts = ["a great movie", "the worst film ever , boring", "the best script", "a dull story"]
    onnx = Bundle.load(tiny_bundle)  # CPU default: onnxruntime
    mindspore = Bundle.load(tiny_bundle, backend="mindspore")
    assert type(onnx.model).__name__ == "OnnxModel" and type(mindspore.model).__name__ == "MindSporeModel"
    np.testing.assert_allclose(onnx.logits(texts), mindspore.logits(texts), atol=1e-4)
    int8 = Bundle.load(tiny_bundle, int8=True).logits(texts)
    assert np.abs(int8 - onnx.logits(texts)).max() < 0.5  # quantized: close, not equal
    with pytest.raises(BundleError, match="onnxruntime backend runs on CPU"):
        Bundle.load(tiny_bundle, device="GPU", backend="onnxruntime")


def test_runtime_on_onnxruntime_never_imports_mindspore_or_the_builder(tiny_bundle):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ptbundle.runtime import Bundle\n"
        f"b = Bundle.load({str(tiny_bundle)!r})\n"
        "print(b.predict(['a great movie'])[0].label)\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('mindspore', 'ptbundle.builder', 'onnx.')))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] in ("neg", "pos") and out[1] == "[]"


def test_tampered_or_incomplete_bundle_is_refused(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="model.onnx: sha256 .* does not match"):
        Bundle.load(copy)
    (copy / "model.mindir").unlink()
    with pytest.raises(BundleError, match="model.mindir: missing"):
        Bundle.load(copy, backend="mindspore")
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.load(tmp_path)
    with pytest.raises(BundleError, match="no such bundle directory"):
        Bundle.load(tmp_path / "nope")


def test_interrupted_build_leaves_no_bundle_and_keeps_the_old_one(tmp_path, tiny_bert, monkeypatch):
    backbone = load_backbone(tiny_bert)
    net = trained_like_net(backbone)
    destination = tmp_path / "exports" / "b"
    write_bundle(destination, net, backbone, minimal_manifest(backbone), curve=[])
    before = {p.name: sha256_file(p) for p in destination.iterdir()}

    def interrupted(manifest, directory):  # Ctrl-C while the last file is written (the one writer's seal)
        (directory / "manifest.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(Manifest, "write", interrupted)
    net.load_head_state({"classifier.bias": np.ones(3, np.float32)})
    with pytest.raises(KeyboardInterrupt):
        write_bundle(destination, net, backbone, minimal_manifest(backbone), curve=[])
    assert os.listdir(tmp_path / "exports") == ["b"]  # no temporary directory left behind
    assert {p.name: sha256_file(p) for p in destination.iterdir()} == before

    fresh = tmp_path / "exports" / "new"
    with pytest.raises(KeyboardInterrupt):
        write_bundle(fresh, net, backbone, minimal_manifest(backbone), curve=[])
    assert not fresh.exists()


def test_export_refuses_a_graph_that_does_not_match(tmp_path, tiny_bert, monkeypatch):
    backbone = load_backbone(tiny_bert)
    net = trained_like_net(backbone)
    real_call = MindSporeModel.__call__
    monkeypatch.setattr(MindSporeModel, "__call__", lambda self, *a: real_call(self, *a) + 1e-3)
    with pytest.raises(ExportError, match="differs from the trained model"):
        write_bundle(tmp_path / "b", net, backbone, minimal_manifest(backbone), curve=[])
    assert not (tmp_path / "b").exists() and os.listdir(tmp_path) == []
