"""Hard-prompt bundles: the zero-shot head folded into the graph, the probe, the comparison, pt-run eval."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TOY_LABEL_TEXTS, TOY_TEMPLATE, write_tsv
from ptbundle.builder.backbones.backbone import load_backbone
from ptbundle.builder.training.hard import CALIBRATION_TEXTS, ZERO_SHOT_SCALE, Verbalizer
from ptbundle.builder.models.classifier import Features, PromptClassifier
from ptbundle.builder.training.forward import cell_logits
from ptbundle.runtime import Bundle
from ptbundle.runtime.format import Manifest
from ptbundle.runtime.cli import cli as run_cli
from ptbundle.runtime.data import read_examples
from ptbundle.runtime.template import Template
from ptbundle.runtime.text import encode, load_tokenizer
from ptbundle.builder.families.encoder import ENCODER
from safetensors.numpy import load_file

TEXTS = ["a great movie", "the worst film ever", "boring acting and a weak story", "the best script", "it was fine"]


def mean_features(backbone, texts, template=None):
    """Mean-pooled encoder states, computed apart from any head."""
    net = PromptClassifier(ENCODER.model(backbone), 0, 2, "mean")
    tokenizer = load_tokenizer(backbone.tokenizer_path, 128)
    return cell_logits(Features(net), encode(tokenizer, texts, template=template), backbone.config.pad_token_id, 32)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("backend", ["onnxruntime", "mindspore"])
def test_zero_shot_graph_is_the_cosine_similarity_to_the_label_descriptions(tiny_build, tiny_bert, toy_files, backend):
    bundle = Bundle.load(tiny_build[0] / "toy-hard-zeroshot", backend=backend)
    backbone = load_backbone(tiny_bert)
    verbalizer = Verbalizer.parse(TOY_LABEL_TEXTS, ("neg", "pos"))
    centroids = unit(np.stack([unit(mean_features(backbone, verbalizer.descriptions[label])).mean(0)
                               for label in ("neg", "pos")]))
    template = Template.parse(TOY_TEMPLATE)
    # the prior: mean cosine over the (unlabelled) training texts the build sampled: all 64 here
    train_texts = [e.text for e in read_examples(toy_files[0])]
    assert len(train_texts) < CALIBRATION_TEXTS
    prior = (unit(mean_features(backbone, train_texts, template)) @ centroids.T).mean(0)
    expected = ZERO_SHOT_SCALE * (unit(mean_features(backbone, TEXTS, template)) @ centroids.T - prior)
    np.testing.assert_allclose(bundle.logits(TEXTS), expected, atol=1e-4)
    # and the calibration did its job: on the training texts neither label is favoured on average
    np.testing.assert_allclose(bundle.logits(train_texts).mean(0), 0, atol=1e-4)


def test_probe_trains_the_head_alone_on_the_template(tiny_build, tiny_bert):
    directory = tiny_build[0] / "toy-hard-probe"
    m = Manifest.read(directory).only
    assert m.kind == "hard" and m.head == "probe" and m.template == TOY_TEMPLATE
    assert m.num_virtual_tokens == 0 and m.recipe["epochs"] == 2 and m.recipe["seed"] == 0
    assert set(load_file(str(directory / "prompt.safetensors"))) == {"classifier.weight", "classifier.bias"}
    log = json.loads((directory / "training_log.json").read_text())
    assert [p["epoch"] for p in log] == [1, 2]
    # the graph is the frozen encoder on the templated text, then the trained head
    backbone = load_backbone(tiny_bert)
    head = load_file(str(directory / "prompt.safetensors"))
    features = mean_features(backbone, TEXTS, Template.parse(TOY_TEMPLATE))
    expected = features @ head["classifier.weight"].T + head["classifier.bias"]
    np.testing.assert_allclose(Bundle.load(directory).logits(TEXTS), expected, atol=1e-4)


def test_pt_build_prints_one_comparison_table_with_the_commands(tiny_build):
    out, stdout = tiny_build
    assert "built 3 bundle(s)" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith(str(out))]
    assert [r.split()[0] for r in rows] == [str(out / n) for n in ("toy-soft", "toy-hard-zeroshot", "toy-hard-probe")]
    assert "--prompt soft" in stdout and "--prompt hard --head zero-shot" in stdout and "--head probe" in stdout
    assert f"--template '{TOY_TEMPLATE}'" in stdout and "--label-text pos=great" in stdout
    assert "pt-run eval --bundle" in stdout


def test_eval_reproduces_each_bundles_recorded_accuracy(tiny_build, toy_files, tmp_path):
    out = tiny_build[0]
    names = ("toy-soft", "toy-hard-zeroshot", "toy-hard-probe")
    args = ["eval", *[x for n in names for x in ("--bundle", str(out / n))], "--data", str(toy_files[1])]
    result = CliRunner().invoke(run_cli, args + ["--json", "--plot", str(tmp_path / "cmp.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 24 and [r["kind"] for r in report["results"]] == ["soft", "hard zero-shot", "hard probe"]
    for name, row in zip(names, report["results"]):
        recorded = Manifest.read(out / name).only.metrics["test"]  # the build's test file is this dev file
        assert row["accuracy"] == pytest.approx(recorded["accuracy"])
        assert row["macro_f1"] == pytest.approx(recorded["macro_f1"])
        assert row["sentences_per_second"] > 0
    png = (tmp_path / "cmp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = CliRunner().invoke(run_cli, args)
    assert table.exit_code == 0 and "hard zero-shot" in table.stdout and "macro-F1" in table.stdout


def test_eval_names_a_label_the_bundle_does_not_know(tiny_bundle, tmp_path):
    f = write_tsv(tmp_path / "odd.tsv", [("a great movie", "pos"), ("a fine movie", "neutral")])
    result = CliRunner().invoke(run_cli, ["eval", "--bundle", str(tiny_bundle), "--data", str(f)])
    assert result.exit_code != 0 and "odd.tsv:3: label 'neutral' is not one of the bundle's labels" in result.output


def test_hard_bundle_predicts_plain_text(tiny_build):
    result = CliRunner().invoke(run_cli, ["predict", "-", "--bundle", str(tiny_build[0] / "toy-hard-probe"),
                                          "--format", "jsonl"], input="a great movie\nthe worst film\n")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == ["a great movie", "the worst film"]


def test_verbalizer_parsing():
    v = Verbalizer.parse(["pos=great", "pos=best movie"], ("neg", "pos"))
    assert v.descriptions == {"neg": ["neg"], "pos": ["great", "best movie"]}  # a label without text: its name
    with pytest.raises(ValueError, match="unknown label 'neutral'"):
        Verbalizer.parse(["neutral=meh"], ("neg", "pos"))
    with pytest.raises(ValueError, match="expected LABEL=DESCRIPTION"):
        Verbalizer.parse(["great"], ("neg", "pos"))


def test_bad_template_fails_before_any_work(tmp_path, toy_files):
    from ptbundle.builder.cli import cli as build_cli

    result = CliRunner().invoke(build_cli, ["export", "--train", str(toy_files[0]), "--dev", str(toy_files[1]),
                                            "--template", "{txet} it was", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "Error: " in result.output and "unknown slot {txet}" in result.output
    assert not (tmp_path / "x").exists()


def test_columns_reach_eval(tiny_bundle, tmp_path):
    f = write_tsv(tmp_path / "c.tsv", [("a great movie", "pos"), ("the worst film", "neg")], header=("review", "y"))
    result = CliRunner().invoke(run_cli, ["eval", "--bundle", str(tiny_bundle), "--data", str(f),
                                          "--text-column", "review", "--label-column", "y", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 2
