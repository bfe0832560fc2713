"""PEFT adapters in and out: `pt-build import` folds real PEFT adapters into bundles whose predictions are PEFT's,
refuses what it cannot fold in one line, and every bundle's peft/ directory imports back to the same predictions.

The adapters in fixtures/peft_adapters/ were written by PEFT 0.21.2 on exactly the tiny checkpoints of
conftest's tiny_bert / tiny_roberta (fixtures/make_prefix_reference.py, fixtures/make_p_tuning_reference.py,
fixtures/make_mean_adapter.py: a FEATURE_EXTRACTION prefix and its mean-pooling head.safetensors), with PEFT's
logits on the stored inputs.  That PEFT itself loads a bundle's peft/ directory is checked by hand
(fixtures/check_peft_roundtrip.py, with torch): these tests have no torch.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from checkpoints import FIXTURES, SENTENCES
from ptbundle.builder.cli import cli
from ptbundle.runtime import Bundle
from ptbundle.runtime.errors import BundleError
from ptbundle.runtime.format import Manifest, Task, verify_files
from ptbundle.builder.families.encoder import ENCODER

FIXTURES = FIXTURES
ADAPTERS = FIXTURES / "peft_adapters"
REFERENCES = {"prefix": np.load(FIXTURES / "prefix_reference.npz"),
              "p-tuning": np.load(FIXTURES / "p_tuning_reference.npz")}
TOLERANCE = 1e-4  # the bundles' ONNX tolerance (onnxruntime's fused kernels sum in another order)

# adapter directory -> (checkpoint, reference file, its case(s)): PEFT's logits on the same ids
CASES = {
    "bert-prefix": ("bert", "prefix", ("tiny-bert-prefix-cls", "tiny-bert-prefix-pair")),
    "bert-prefix-projection": ("bert", "prefix", ("tiny-bert-prefix-projection",)),
    "bert-prefix-mean": ("bert", "prefix", ("tiny-bert-prefix-mean",)),  # FEATURE_EXTRACTION + head.safetensors
    "roberta-prefix": ("roberta", "prefix", ("tiny-roberta-prefix-cls",)),
    "bert-prompt-tuning": ("bert", "prefix", ("bert-prompt-tuning",)),
    "bert-p-tuning-mlp": ("bert", "p-tuning", ("bert-p-tuning-mlp",)),
    "roberta-p-tuning-lstm": ("roberta", "p-tuning", ("roberta-p-tuning-lstm",)),
}


def run_import(*args):
    return CliRunner().invoke(cli, ["import", *map(str, args)])


@pytest.fixture(scope="module")
def checkpoints_by_family(tiny_bert, tiny_roberta):
    return {"bert": tiny_bert, "roberta": tiny_roberta}


@pytest.fixture(scope="module")
def imported(tmp_path_factory, checkpoints_by_family):
    """adapter name -> bundle built from it by the real CLI (each built once for the module)."""
    out, built = tmp_path_factory.mktemp("imported"), {}

    def get(name):
        if name not in built:
            family = CASES[name][0]
            result = run_import(ADAPTERS / name, "--backbone", checkpoints_by_family[family], "--out", out,
                                "--name", name)
            assert result.exit_code == 0, result.output + repr(result.exception)
            built[name] = out / name
        return built[name]

    return get


def arrays(reference, case):
    return [reference[f"{case}/{k}"] for k in ("input_ids", "attention_mask", "token_type_ids")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_imported_adapter_predicts_what_peft_predicts(name, imported):
    family, source, cases = CASES[name]
    reference = REFERENCES[source]
    bundle = Bundle.load(imported(name))
    task = bundle.manifest.only
    assert task.pooling == ("mean" if name.endswith("-mean") else "cls")
    assert task.recipe["source"] == "peft" and task.num_virtual_tokens == 3
    assert task.prompt_method == ("prefix-tuning" if "prefix" in name else "prompt-tuning")
    for case in cases:
        expected = reference[f"{case}/logits"]
        assert np.abs(expected).max() > 0.1  # not a comparison of near-zeros
        got = bundle.model(*arrays(reference, case))  # model.onnx on PEFT's own ids, mask and token types
        assert np.abs(got - expected).max() <= TOLERANCE, (case, np.abs(got - expected).max())
        if not case.endswith("-pair"):  # and through the runtime's own tokenizing and batching
            np.testing.assert_allclose(bundle.logits(SENTENCES, batch_size=2), expected, atol=TOLERANCE, rtol=0)


def test_imported_mindir_agrees(imported):
    """The MindIR graph of an imported bundle is checked like every bundle's; it runs the same logits."""
    path = imported("roberta-prefix")
    onnx, mindir = Bundle.load(path), Bundle.load(path, backend="mindspore")
    np.testing.assert_allclose(mindir.logits(SENTENCES), onnx.logits(SENTENCES), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_imported_bundle_writes_the_adapter_back_as_peft_does(name, imported, checkpoints_by_family):
    """peft/ in the imported bundle: the tensors PEFT saved, byte for byte, and the config fields PEFT writes for
    that method; a reparameterized adapter (prefix projection, P-tuning) comes back as its saved table."""
    bundle = imported(name)
    manifest = Manifest.read(bundle)
    assert manifest.only.details["peft"] == "peft"
    assert {"peft/adapter_config.json", "peft/adapter_model.safetensors"} <= set(manifest.files)
    ours = json.loads((bundle / "peft" / "adapter_config.json").read_text())
    peft_type = "PREFIX_TUNING" if "prefix" in name else "PROMPT_TUNING"
    model = ADAPTERS / (name if name.endswith("-mean") else "bert-prefix" if peft_type == "PREFIX_TUNING"
                        else "bert-prompt-tuning")  # PEFT's own files
    theirs = json.loads((model / "adapter_config.json").read_text())
    assert ours["base_model_name_or_path"] == Path(checkpoints_by_family[CASES[name][0]]).name
    assert {**ours, "base_model_name_or_path": "tiny-bert"} == theirs
    source = ADAPTERS / name
    assert load_file(str(bundle / "peft" / "adapter_model.safetensors")).keys() == \
        load_file(str(source / "adapter_model.safetensors")).keys()
    assert (bundle / "peft" / "adapter_model.safetensors").read_bytes() == \
        (source / "adapter_model.safetensors").read_bytes()
    assert sorted(p.name for p in (bundle / "peft").iterdir()) == sorted(p.name for p in source.iterdir())
    if name.endswith("-mean"):
        assert load_file(str(bundle / "peft" / "head.safetensors")).keys() == {"weight", "bias"}
        for key, value in load_file(str(source / "head.safetensors")).items():
            np.testing.assert_array_equal(load_file(str(bundle / "peft" / "head.safetensors"))[key], value)


# ---------------------------------------------------------------- refusals


def edited(tmp_path, source="bert-prefix", config=None, drop=(), files=None):
    """A copy of a fixture adapter with config fields replaced, files removed or written."""
    d = tmp_path / "adapter"
    shutil.copytree(ADAPTERS / source, d)
    if config:
        path = d / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}, indent=2))
    for name in drop:
        (d / name).unlink()
    for name, content in (files or {}).items():
        content(d / name) if callable(content) else (d / name).write_bytes(content)
    return d


def prompt_only(path):
    save_file({"prompt_embeddings": np.zeros((3, 128), np.float32)}, str(path))


REFUSALS = {
    "lora": (dict(config={"peft_type": "LORA"}), "adapter_config.json: peft_type 'LORA': ptbundle folds"
             " PROMPT_TUNING, P_TUNING and PREFIX_TUNING adapters"),
    "multitask": (dict(config={"peft_type": "MULTITASK_PROMPT_TUNING"}), "task id"),
    "feature-extraction": (dict(config={"task_type": "FEATURE_EXTRACTION"}),
                           "adapter_config.json: task_type 'FEATURE_EXTRACTION': the adapter has no classification"
                           " head"),
    "causal-lm": (dict(config={"task_type": "CAUSAL_LM"}), "task_type 'CAUSAL_LM'"),
    "encoder-decoder": (dict(config={"num_transformer_submodules": 2}), "num_transformer_submodules 2"),
    "num-layers": (dict(config={"num_layers": 3}), "adapter_config.json: num_layers 3, but backbone"),
    "token-dim": (dict(config={"token_dim": 64}), "token_dim 64"),
    "heads": (dict(config={"num_attention_heads": 8}), "num_attention_heads 8"),
    "virtual-tokens": (dict(config={"num_virtual_tokens": 4}), "prompt_embeddings has shape (3, 128)"),
    "no-config": (dict(drop=["adapter_config.json"]), "not a PEFT adapter directory (no adapter_config.json)"),
    "no-weights": (dict(drop=["adapter_model.safetensors"]), "missing adapter_model.safetensors"),
    "pickle": (dict(drop=["adapter_model.safetensors"], files={"adapter_model.bin": b"\x80\x04K\x00."}),
               "adapter_model.bin: ptbundle reads adapter_model.safetensors only; re-save"),
    "corrupt": (dict(files={"adapter_model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"}),
                "adapter_model.safetensors: cannot read safetensors"),
    "truncated": (dict(files={"adapter_model.safetensors": (ADAPTERS / "bert-prefix" / "adapter_model.safetensors")
                              .read_bytes()[:500]}), "adapter_model.safetensors: cannot read safetensors"),
    "no-classifier": (dict(files={"adapter_model.safetensors": prompt_only}),
                      "no classifier tensor 'base_model.classifier.weight'"),
    "roberta-head-on-bert": (dict(source="roberta-prefix"), "it holds a roberta head, the backbone is bert"),
    "mean-head-of-a-prompt": (dict(source="bert-prefix-mean", config={"peft_type": "PROMPT_TUNING"}),
                              "with head.safetensors: ptbundle folds it for PREFIX_TUNING only"),
    "mean-head-key": (dict(source="bert-prefix-mean", files={"head.safetensors": lambda p: save_file(
        {"weight": np.zeros((2, 32), np.float32)}, str(p))}), "head.safetensors: no tensor 'bias'"),
    "mean-head-shape": (dict(source="bert-prefix-mean", files={"head.safetensors": lambda p: save_file(
        {"weight": np.zeros((2, 16), np.float32), "bias": np.zeros(2, np.float32)}, str(p))}),
        "head.safetensors: weight has shape (2, 16), expected (2, 32)"),
    "mean-adapter-with-a-head-inside": (dict(source="bert-prefix-mean", files={
        "adapter_model.safetensors": (ADAPTERS / "bert-prefix" / "adapter_model.safetensors").read_bytes()}),
        "unexpected tensor 'base_model.classifier.bias': a FEATURE_EXTRACTION adapter holds prompt_embeddings only"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_adapters_it_cannot_fold_are_one_line_and_leave_nothing(case, tmp_path, tiny_bert):
    how, message = REFUSALS[case]
    out = tmp_path / "exports"
    result = run_import(edited(tmp_path, **how), "--backbone", tiny_bert, "--out", out, "--name", "x")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and str(tmp_path / "adapter") in errors[0]  # names the file
    assert not (out / "x").exists() and os.listdir(out) == []  # no bundle, no half-written one


def test_a_mean_adapter_on_bert_sentence_pairs_is_refused(tmp_path, tiny_bert, tiny_roberta):
    """PEFT's FEATURE_EXTRACTION model drops token_type_ids, which BERT reads for the second text."""
    result = run_import(ADAPTERS / "bert-prefix-mean", "--backbone", tiny_bert, "--out", tmp_path, "--pair")
    assert result.exit_code == 1 and "drops token_type_ids" in result.output and os.listdir(tmp_path) == []
    from ptbundle.builder.backbones.backbone import load_backbone
    from ptbundle.builder.models.classifier import PromptClassifier
    from ptbundle.builder.bundles.peft import write_adapter
    from ptbundle.builder.models.prompts import PromptSpec

    pairs = task("mean", "prefix-tuning").replace(pair=True)
    refused = "not expressible: mean pooling of sentence pairs"
    for checkpoint, expected in ((tiny_bert, refused), (tiny_roberta, "peft")):
        backbone = load_backbone(checkpoint)
        net = PromptClassifier(ENCODER.model(backbone), 3, 2, "mean", spec=PromptSpec.of("prefix-tuning", 3))
        out = tmp_path / backbone.config.model_type / "peft"
        out.parent.mkdir()
        # the directory's name when written; RoBERTa has no token types to lose
        assert write_adapter(out, net, pairs, backbone).startswith(expected)
        assert out.exists() == (expected == "peft")


def test_labels_must_fit_the_classifier(tmp_path, tiny_bert):
    result = run_import(ADAPTERS / "bert-prefix", "--backbone", tiny_bert, "--out", tmp_path, "--labels", "a,b,c")
    assert result.exit_code == 1 and "--labels names 3 labels; the classifier in" in result.output
    result = run_import(ADAPTERS / "bert-prefix-mean", "--backbone", tiny_bert, "--out", tmp_path, "--labels", "a")
    assert result.exit_code == 1 and "head.safetensors has 2 outputs" in result.output  # the file with the head


# ---------------------------------------------------------------- out: which bundles carry peft/, and why not


def task(pooling="cls", method="prompt-tuning", kind="soft"):
    return Task(name="t", kind=kind, labels=("a", "b"), pair=False, max_length=16, pooling=pooling, head="linear",
                prompt_method=method, num_virtual_tokens=3)


@pytest.mark.parametrize("method, layer, pooling, kind, expected", [
    ("prompt-tuning", 0, "cls", "soft", "peft"),
    ("prefix-tuning", 0, "cls", "soft", "peft"),
    ("prefix-tuning", 0, "mean", "soft", "peft"),  # FEATURE_EXTRACTION, its head in head.safetensors
    ("prompt-tuning", 0, "mean", "soft", "not expressible: mean pooling with prompt-tuning (PEFT's"
                                         " sequence-classification heads read the first position"),
    ("prefix-tuning", 1, "cls", "soft", "not expressible: prefix from layer 1"),
    ("late-prompt", 1, "cls", "soft", "not expressible: late prompt (enters at layer 1"),
    ("none", 0, "cls", "hard", "not expressible: hard prompt"),
])
def test_write_adapter_writes_what_peft_expresses_and_says_why_not(method, layer, pooling, kind, expected, tmp_path,
                                                                    tiny_bert):
    from ptbundle.builder.backbones.backbone import load_backbone
    from ptbundle.builder.models.classifier import PromptClassifier
    from ptbundle.builder.bundles.peft import write_adapter
    from ptbundle.builder.models.prompts import PromptSpec

    backbone = load_backbone(tiny_bert)
    spec = PromptSpec.of(method, 3 if method != "none" else 0, layer=layer)
    net = PromptClassifier(ENCODER.model(backbone), spec.virtual_tokens, 2, pooling, spec=spec)
    if pooling == "cls":
        weight, bias = backbone.pooler_weights()
        net.load_head_state({"pooler.weight": weight, "pooler.bias": bias})
    status = write_adapter(tmp_path / "peft", net, task(pooling, method, kind), backbone)
    assert status.startswith(expected)
    assert (tmp_path / "peft").exists() == (status == "peft")
    if status == "peft":
        assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"] + (
            ["head.safetensors"] if pooling == "mean" else [])
        config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert config["task_type"] == ("FEATURE_EXTRACTION" if pooling == "mean" else "SEQ_CLS")


def test_a_bert_pooler_other_than_the_checkpoints_is_not_expressible(tmp_path, tiny_bert):
    """PEFT's BertForSequenceClassification reads the checkpoint's pooler, which an adapter does not carry."""
    from ptbundle.builder.backbones.backbone import load_backbone
    from ptbundle.builder.models.classifier import PromptClassifier
    from ptbundle.builder.bundles.peft import write_adapter

    backbone = load_backbone(tiny_bert)
    net = PromptClassifier(ENCODER.model(backbone), 3, 2, "cls")  # a pooler that is not the checkpoint's
    status = write_adapter(tmp_path / "peft", net, task(), backbone)
    assert status.startswith("not expressible: a trained pooler") and not (tmp_path / "peft").exists()


def test_merged_bundles_say_why_they_carry_no_adapter():
    from ptbundle.builder.bundles.peft import bundle_adapter
    from ptbundle.runtime.format import BackboneInfo

    backbone = BackboneInfo("b", "bert", 32, 2, 4, 64, 60, "0" * 64)
    tasks = (task().replace(name="a", details={"peft": "peft"}), task(pooling="mean").replace(name="b"))
    manifest = bundle_adapter(None, None, Manifest(tasks=tasks, pad_id=0, backbone=backbone, device="CPU"), None)
    assert {t.details["peft"] for t in manifest.tasks} == {
        "not expressible: several tasks in one graph (a PEFT adapter holds one prompt and head)"}


# ---------------------------------------------------------------- round trip: bundle -> peft/ -> pt-build import


@pytest.mark.parametrize("family, options", [
    ("bert", ["--method", "prefix-tuning", "--pooling", "cls"]),
    ("roberta", ["--method", "prompt-tuning", "--pooling", "cls"]),  # RoBERTa's trained head dense: classifier.dense
    ("bert", ["--method", "prefix-tuning", "--pooling", "mean"]),  # the default: FEATURE_EXTRACTION + head.safetensors
])
def test_a_bundles_peft_directory_imports_to_the_same_predictions(family, options, tmp_path, toy_files,
                                                                  checkpoints_by_family):
    from ptbundle.runtime.cli import cli as run_cli

    train, dev = toy_files
    backbone = checkpoints_by_family[family]
    result = CliRunner().invoke(cli, ["export", "--prompt", "soft", "--train", str(train), "--dev", str(dev),
                                      "--backbone", str(backbone), "--virtual-tokens", "3", "--epochs", "1",
                                      "--batch-size", "8", "--out", str(tmp_path),
                                      "--name", "toy", *options])
    assert result.exit_code == 0, result.output + repr(result.exception)
    original = tmp_path / "toy"
    manifest = Manifest.read(original)
    assert manifest.only.details["peft"] == "peft"
    # nested files are hashed by their relative path, and checked like the others
    mean = "mean" in options
    assert sorted(manifest.files) == ["model.mindir", "model.onnx", "peft/adapter_config.json",
                                      "peft/adapter_model.safetensors"] + (["peft/head.safetensors"] if mean else []) \
        + ["prompt.safetensors", "tokenizer.json", "training_log.json"]
    verify_files(original, manifest)
    info = CliRunner().invoke(run_cli, ["info", str(original)])
    assert info.exit_code == 0 and "peft/adapter_model.safetensors" in info.output
    assert "peft        peft/ (PeftModel.from_pretrained)" in info.output

    result = run_import(original / "peft", "--backbone", backbone, "--out", tmp_path, "--name", "back",
                        "--train", train, "--dev", dev)
    assert result.exit_code == 0, result.output + repr(result.exception)
    back = tmp_path / "back"
    texts = [line.split("\t")[0] for line in dev.read_text().splitlines()[1:]]
    np.testing.assert_allclose(Bundle.load(back).logits(texts), Bundle.load(original).logits(texts), atol=1e-5,
                               rtol=0)
    imported = Manifest.read(back).only
    assert imported.labels == manifest.only.labels  # the data's labels, in the classifier's order
    assert imported.metrics["dev"]["accuracy"] == pytest.approx(manifest.only.metrics["dev"]["accuracy"])
    assert imported.pooling == ("mean" if mean else "cls")
    for name in ("adapter_config.json", "adapter_model.safetensors") + (("head.safetensors",) if mean else ()):
        # written again, the same bytes
        assert (back / "peft" / name).read_bytes() == (original / "peft" / name).read_bytes()

    (original / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(BundleError, match="adapter_config.json: sha256"):
        verify_files(original, manifest)


def test_file_names_outside_the_bundle_are_refused(tmp_path):
    from ptbundle.runtime.format import BackboneInfo

    manifest = Manifest(tasks=(task(),), pad_id=0, backbone=BackboneInfo("b", "bert", 32, 2, 4, 64, 60, "0" * 64),
                        device="CPU", files={"model.onnx": "a" * 64, "peft/adapter_config.json": "b" * 64})
    assert Manifest.from_json(manifest.to_json()).files == manifest.files  # nested names read back
    for bad in ("../model.onnx", "/etc/passwd", "peft//x", "peft/../../x"):
        raw = {**manifest.to_json(), "files": {bad: "c" * 64}}
        with pytest.raises(BundleError, match="field 'files' names"):
            Manifest.from_json(raw, tmp_path / "manifest.json")


def test_keys_with_the_adapter_name_read_the_same(tmp_path, tiny_roberta):
    """An in-memory state dict's names ("classifier.modules_to_save.<adapter>.") read as what save_pretrained writes."""
    from ptbundle.builder.backbones.backbone import load_backbone
    from ptbundle.builder.bundles.peft import read_adapter

    backbone = load_backbone(tiny_roberta)
    saved = load_file(str(ADAPTERS / "roberta-prefix" / "adapter_model.safetensors"))
    renamed = {k.replace("classifier.", "classifier.modules_to_save.default."): v for k, v in saved.items()}
    d = edited(tmp_path, "roberta-prefix", files={"adapter_model.safetensors": lambda p: save_file(renamed, str(p))})
    plain, named = read_adapter(ADAPTERS / "roberta-prefix", backbone), read_adapter(d, backbone)
    assert plain.spec == named.spec and plain.values.keys() == named.values.keys()
    assert all(np.array_equal(plain.values[k], named.values[k]) for k in plain.values)
    assert set(plain.values) == {"prompt_embeddings", "pooler.weight", "pooler.bias", "classifier.weight",
                                 "classifier.bias"}
