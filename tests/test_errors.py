"""User mistakes, run as a user runs them: the real `pt-build` / `pt-run` processes.

Each must exit non-zero with one `Error: ...` line that names the problem,
and never print a traceback.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_tsv

BIN = Path(sys.executable).parent


def run(tool, *args, cwd=None, stdin=b""):
    done = subprocess.run([str(BIN / tool), *map(str, args)], input=stdin, capture_output=True, cwd=cwd,
                          timeout=300)
    return done.returncode, done.stderr.decode("utf-8", "replace"), done.stdout.decode("utf-8", "replace")


def assert_one_error_line(code, stderr, *expected, status=1):
    assert code == status, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr
    for text in expected:
        assert text in errors[0], errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, toy_files):
    d = tmp_path_factory.mktemp("user-errors")
    bad_rows = d / "bad.tsv"
    bad_rows.write_text("text\tlabel\ngood film\tpos\nno label\n", encoding="utf-8")
    gpt = d / "gpt2-checkpoint"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    (gpt / "model.safetensors").write_bytes(b"")
    (gpt / "tokenizer.json").write_text("{}")
    return {"train": toy_files[0], "dev": toy_files[1], "bad_rows": bad_rows, "gpt": gpt, "dir": d}


@pytest.mark.parametrize("args, expected, status", [
    (["--init", "text"], ["--init text needs --init-text"], 1),
    (["--init", "random", "--init-text", "a good film"], ["--init-text", "--init random"], 1),
    (["--prompt", "soft", "--head", "probe"], ["--head", "--prompt hard"], 2),
    (["--prompt", "soft", "--template", "{text} It was"], ["--template", "--prompt hard"], 2),
    (["--batch-size", "0"], ["--batch-size"], 2),
    (["--pooling", "max"], ["--pooling"], 2),
    (["--data", "imdb"], ["unknown dataset 'imdb'"], 2),
], ids=["init-text-missing", "init-conflict", "head-with-soft", "template-with-soft", "batch-size-0",
        "unknown-pooling", "unknown-dataset"])
def test_build_option_mistakes_fail_before_any_work(tmp_path, args, expected, status):
    code, stderr, _ = run("pt-build", "export", "--out", tmp_path / "exports", *args)
    assert_one_error_line(code, stderr, *expected, status=status)
    assert not (tmp_path / "exports").exists()


def test_build_refuses_an_output_it_cannot_write_before_training(tmp_path, files, tiny_bert):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, stderr, _ = run("pt-build", "export", "--train", files["train"], "--dev", files["dev"],
                          "--backbone", tiny_bert, "--out", blocker / "exports")
    assert_one_error_line(code, stderr, "--out", "cannot create it")
    assert "epoch" not in stderr  # refused before any training


@pytest.mark.parametrize("tool", ["pt-build", "pt-run"])
def test_a_device_mindspore_cannot_use_here_is_one_line(tmp_path, files, tiny_bert, tiny_bundle, tool):
    if tool == "pt-build":
        args = ["export", "--prompt", "soft", "--train", files["train"], "--dev", files["dev"],
                "--backbone", tiny_bert, "--device", "Ascend", "--out", tmp_path / "exports"]
    else:
        args = ["predict", "--bundle", tiny_bundle, "--device", "Ascend", "-"]
    code, stderr, _ = run(tool, *args, stdin=b"a great movie\n")
    if code == 0:
        pytest.skip("MindSpore runs on Ascend on this machine")
    assert_one_error_line(code, stderr, "MindSpore cannot run on Ascend here")


def test_eval_names_a_plot_path_it_cannot_write(tiny_bundle, files, tmp_path):
    code, stderr, stdout = run("pt-run", "eval", "--bundle", tiny_bundle, "--data", files["dev"],
                               "--plot", tmp_path / "missing" / "cmp.png")
    assert_one_error_line(code, stderr, "--plot", "no directory", "to write it into")
    assert stdout == ""  # refused before scoring: no table printed then thrown away


def test_build_names_the_bad_row(tmp_path, files, tiny_bert):
    code, stderr, _ = run("pt-build", "export", "--train", files["bad_rows"], "--dev", files["dev"],
                          "--backbone", tiny_bert, "--out", tmp_path / "exports")
    assert_one_error_line(code, stderr, "bad.tsv:3", "1 fields, the header has 2")
    assert not (tmp_path / "exports").exists()


def test_build_refuses_a_backbone_of_the_wrong_kind(tmp_path, files):
    code, stderr, _ = run("pt-build", "export", "--train", files["train"], "--dev", files["dev"],
                          "--backbone", files["gpt"], "--out", tmp_path / "exports")
    assert_one_error_line(code, stderr, "config.json", "gpt2", "bert")


def test_build_refuses_a_length_the_backbone_cannot_hold(tmp_path, files, tiny_bert):
    code, stderr, _ = run("pt-build", "export", "--train", files["train"], "--dev", files["dev"],
                          "--backbone", tiny_bert, "--max-length", "1000", "--out", tmp_path / "exports")
    assert_one_error_line(code, stderr, "--max-length 1000", "positions")


@pytest.fixture()
def bundle_copy(tmp_path, tiny_bundle):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_run_refuses_a_corrupted_graph(bundle_copy):
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    code, stderr, stdout = run("pt-run", "predict", "--bundle", bundle_copy, "-", stdin=b"a great movie\n")
    assert_one_error_line(code, stderr, "model.onnx", "sha256")
    assert stdout == ""


@pytest.mark.parametrize("change, expected", [
    (lambda m: m["tasks"][0].pop("labels"), ["manifest.json", "missing field 'tasks[0].labels'"]),
    (lambda m: m.update(format_version=99), ["format_version 99", "rebuild"]),
    (lambda m: m["tasks"][0].update(max_length="long"), ["field 'tasks[0].max_length'"]),
    (lambda m: m["tasks"][0].update(labels=["pos", "pos"]), ["field 'tasks[0].labels'", "duplicates"]),
    (lambda m: m["tasks"][0].update(template="{txet}"), ["field 'tasks[0].template'", "unknown slot"]),
    (lambda m: m.update(tasks=[]), ["field 'tasks'", "at least one task"]),
], ids=["missing-field", "future-version", "wrong-type", "duplicate-labels", "bad-template", "no-tasks"])
def test_run_names_the_bad_manifest_field(bundle_copy, change, expected):
    edit_manifest(bundle_copy, change)
    code, stderr, _ = run("pt-run", "predict", "--bundle", bundle_copy, "-", stdin=b"a great movie\n")
    assert_one_error_line(code, stderr, *expected)


def test_info_reads_a_round_one_bundle(bundle_copy):
    """format_version 1 bundles are read as they were written in round 1."""
    def as_v1(m):
        task = m.pop("tasks")[0]
        task["task"] = task.pop("name")
        m.update(task)
        m.update(format_version=1, inputs=list(m.pop("signature")["inputs"]), outputs=["logits"])
        for key in ("head", "prompt_method", "details"):
            m.pop(key)
        m["backbone"] = {k: m["backbone"][k] for k in ("name", "model_type", "hidden_size", "layers", "sha256")}
    edit_manifest(bundle_copy, as_v1)
    code, stderr, stdout = run("pt-run", "predict", "--bundle", bundle_copy, "-", stdin=b"a great movie\n")
    assert code == 0, stderr
    assert stdout.split("\t")[0] in ("neg", "pos")


@pytest.mark.parametrize("stdin, expected", [
    (b"", ["no input lines"]),
    (b"a great movie\n\xff\xfe bad bytes\n", ["<stdin>:2", "UTF-8"]),
    (b"a great movie\n\n\nthe worst\n", ["<stdin>:2", "empty line"]),
], ids=["empty", "bad-utf8", "blank-line"])
def test_predict_names_the_bad_input_line_and_prints_nothing(tiny_bundle, stdin, expected):
    code, stderr, stdout = run("pt-run", "predict", "--bundle", tiny_bundle, "-", stdin=stdin)
    assert code == 1 and "Traceback" not in stderr and stdout == ""
    assert all(text in stderr for text in expected), stderr


@pytest.mark.parametrize("args, expected", [
    (["predict", "--bundle", "/nonexistent/bundle", "-"], ["no such bundle directory"]),
    (["predict", "--bundle", "{tmp}", "-"], ["not a bundle"]),
    (["eval", "--bundle", "{bundle}", "--data", "{unknown_labels}"], ["label 'meh'", "not one of the bundle's labels"]),
    (["predict", "--bundle", "{bundle}", "--backend", "mindspore", "--int8", "-"], ["int8"]),
], ids=["missing-bundle", "not-a-bundle", "unknown-label", "int8-on-mindspore"])
def test_run_mistakes(tmp_path, tiny_bundle, args, expected):
    unknown = write_tsv(tmp_path / "unknown.tsv", [("a great movie", "meh")])
    args = [a.format(tmp=tmp_path, bundle=tiny_bundle, unknown_labels=unknown) for a in args]
    code, stderr, _ = run("pt-run", *args, stdin=b"a great movie\n")
    assert_one_error_line(code, stderr, *expected)


def test_pt_build_without_the_build_extra_is_one_line_naming_it():
    """The runtime-only install has pt-build too: without MindSpore it names the extra instead of a traceback."""
    code = ("import sys; sys.modules['mindspore'] = None; sys.argv = ['pt-build', 'export']\n"
            "from ptbundle.builder.main import main; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_one_error_line(done.returncode, done.stderr, "mindspore not installed", "pip install 'ptbundle[build]'")


def test_label_texts_with_the_probe_head_are_refused_not_dropped(tmp_path, files, tiny_bert):
    code, stderr, _ = run("pt-build", "export", "--prompt", "hard", "--head", "probe", "--label-text", "pos=great",
                          "--train", files["train"], "--dev", files["dev"], "--backbone", tiny_bert,
                          "--out", tmp_path / "exports")
    assert_one_error_line(code, stderr, "--label-text", "--head probe", status=2)
    assert not (tmp_path / "exports").exists()


def test_an_int8_build_prints_no_line_of_another_library(tmp_path, files, tiny_bert):
    """onnxruntime's quantizer advises pre-processing for image models on every call: not shown."""
    code, stderr, stdout = run("pt-build", "export", "--prompt", "hard", "--head", "probe", "--quantize", "int8",
                               "--train", files["train"], "--dev", files["dev"], "--backbone", tiny_bert,
                               "--epochs", "1", "--out", tmp_path / "exports")
    assert code == 0, stderr
    assert "WARNING" not in stderr and "pre-processing" not in stderr, stderr
    assert "int8 test" in stdout  # the int8 graph was written and scored
