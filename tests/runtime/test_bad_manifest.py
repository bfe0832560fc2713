"""A hand-edited manifest is checked against the graph it describes, and `pt-run info` checks every file.

Copies of the real `tiny_bundle`, edited as a user would edit them; pt-run runs as a real process.
"""

import pytest

from conftest import build, write_tsv
from helpers import assert_one_error_line, copy_bundle, edit_manifest, pt_run, write_chat_bundle
from ptbundle.runtime import Bundle
from ptbundle.runtime.errors import BundleError


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path / "copy")


def task_field(name, value):
    return lambda m: m["tasks"][0].update({name: value})


@pytest.mark.parametrize("change, expected", [
    (task_field("labels", ["neg", "pos", "meh"]),
     "field 'tasks[0].labels' lists 3 labels, but model.onnx gives 2 logits per row"),
    (task_field("max_length", 0), "field 'tasks[0].max_length' must be an integer from 1 to 8192"),
    (task_field("max_length", 100000), "field 'tasks[0].max_length' must be an integer from 1 to 8192"),
    (task_field("head", "bogus"), "field 'tasks[0].head' is 'bogus', not one of 'linear', 'label-words',"
                                  " 'zero-shot', 'probe', 'lm'"),
], ids=["three-labels", "max-length-0", "max-length-100000", "head"])
def test_a_hand_edited_manifest_is_one_error_line(bundle_copy, change, expected):
    edit_manifest(bundle_copy, change)
    code, err, out = pt_run("predict", "--bundle", bundle_copy, "-", stdin=b"a great movie\n")
    assert_one_error_line(code, err, f"{bundle_copy / 'manifest.json'}: {expected}")
    assert out == ""
    with pytest.raises(BundleError, match="manifest.json: field 'tasks\\[0\\]"):
        Bundle.load(bundle_copy)


def test_a_label_removed_is_refused_not_renormalised(tiny_bert, tmp_path):
    """A three-label graph whose manifest lost a label would spread the probability over the two left."""
    rows = [("a great movie", "pos"), ("a dull movie", "neg"), ("the film", "meh")] * 8
    data = write_tsv(tmp_path / "three.tsv", rows)
    build(["export", "--train", str(data), "--dev", str(data), "--backbone", str(tiny_bert), "--prompt", "soft",
           "--virtual-tokens", "2", "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "exports"),
           "--name", "three"])
    three = tmp_path / "exports" / "three"
    assert len(Bundle.load(three).labels) == 3
    edit_manifest(three, task_field("labels", ["meh", "neg"]))
    with pytest.raises(BundleError, match="field 'tasks\\[0\\].labels' lists 2 labels, but model.onnx gives 3"):
        Bundle.load(three)


def test_the_mindspore_backend_checks_the_width_when_it_runs(bundle_copy):
    edit_manifest(bundle_copy, task_field("labels", ["neg", "pos", "meh"]))
    bundle = Bundle.load(bundle_copy, backend="mindspore")  # GraphCell knows its output's width only once run
    with pytest.raises(BundleError, match="model.mindir: 2 logits per row, fewer than the 3 labels its"
                                          " manifest.json lists"):
        bundle.predict(["a great movie"])


def test_a_generation_bundle_max_length_is_bounded_by_its_context(tmp_path):
    chat = write_chat_bundle(tmp_path)
    Bundle.load(chat)  # as written
    edit_manifest(chat, lambda m: m["tasks"][0].update(max_length=m["tasks"][0]["details"]["generation"]
                                                        ["max_positions"] + 1))
    with pytest.raises(BundleError, match="field 'tasks\\[0\\].max_length' must be an integer from 1 to"):
        Bundle.load(chat)


def test_info_checks_every_file_and_names_the_one_that_differs(bundle_copy):
    code, err, out = pt_run("info", bundle_copy)
    assert code == 0, err
    assert "model.onnx" in out and "DIFFERS" not in out and out.count("  ok\n") >= 5
    data = (bundle_copy / "model.onnx").read_bytes()
    (bundle_copy / "model.onnx").write_bytes(data[: len(data) // 2])  # truncated
    code, err, out = pt_run("info", bundle_copy)
    assert_one_error_line(code, err, f"{bundle_copy / 'model.onnx'}: sha256", "does not match the manifest's")
    assert [line.split()[0] for line in out.splitlines() if line.endswith("DIFFERS")] == ["model.onnx"]


def test_info_names_a_missing_file(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "prompt.safetensors").write_bytes(b"")
    code, err, out = pt_run("info", bundle_copy)
    # The first in the manifest's order is named, the others counted; every one is marked in the listing.
    assert_one_error_line(code, err, f"{bundle_copy / 'prompt.safetensors'}: sha256",
                          "and 1 more file(s), marked above")
    assert [line.split()[0] for line in out.splitlines() if line.endswith("MISSING")] == ["tokenizer.json"]
    assert [line.split()[0] for line in out.splitlines() if line.endswith("DIFFERS")] == ["prompt.safetensors"]
