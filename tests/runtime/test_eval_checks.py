"""pt-run eval checks what can fail before it scores anything, and names the bundle of a per-bundle error; a
label column given as the text column is refused by pt-run eval and pt-build alike (runtime/data.py).

The command runs in-process (click's runner) where a test must see that no bundle was scored: `score` is
wrapped to count its calls, the rest is the real command on real bundles.
"""

import sys

import pytest
from click.testing import CliRunner

from conftest import write_tsv
from helpers import assert_one_error_line, copy_bundle, edit_manifest, pt_run, write_chat_bundle
from ptbundle.runtime import cli as runtime_cli, evaluate
from ptbundle.runtime.cli import cli


@pytest.fixture()
def scored(monkeypatch):
    """The bundles `score` was called on, in order."""
    calls = []
    real = evaluate.score

    def counting(bundle, *args, **kwargs):
        calls.append(bundle.directory)
        return real(bundle, *args, **kwargs)

    monkeypatch.setattr(runtime_cli, "score", counting)  # the name pt-run eval calls
    return calls


def evaluate_(bundles, data, *args):
    result = CliRunner().invoke(cli, ["eval", *(x for b in bundles for x in ("--bundle", str(b))), "--data",
                                      str(data), *map(str, args)])
    return result.exit_code, result.output


def one_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def test_a_plot_without_matplotlib_is_refused_before_scoring(tiny_build, toy_files, scored, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError, as uninstalled
    code, output = evaluate_([tiny_build[0] / "toy-soft"], toy_files[1], "--plot", tmp_path / "chart.png")
    assert code == 1 and scored == []
    assert one_error(output) == "Error: --plot needs matplotlib: pip install 'ptbundle[plot]'"


def test_a_plot_into_a_missing_directory_is_refused_before_scoring(tiny_build, toy_files, scored, tmp_path):
    chart = tmp_path / "nope" / "chart.png"
    code, output = evaluate_([tiny_build[0] / "toy-soft"], toy_files[1], "--plot", chart)
    assert code == 1 and scored == []
    assert one_error(output) == f"Error: --plot {chart}: no directory {chart.parent} to write it into"


def test_a_corrupted_third_bundle_is_refused_before_scoring(tiny_build, toy_files, scored, tmp_path):
    exports = tiny_build[0]
    bad = copy_bundle(exports / "toy-soft", tmp_path / "third")
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 2])  # truncated
    code, output = evaluate_([exports / "toy-soft", exports / "toy-hard-probe", bad], toy_files[1])
    assert code == 1 and scored == []
    assert f"{bad / 'model.onnx'}: sha256" in one_error(output)


def test_labels_that_do_not_fit_the_data_name_the_bundle_before_scoring(tiny_build, toy_files, scored, tmp_path):
    exports = tiny_build[0]
    renamed = copy_bundle(exports / "toy-soft", tmp_path / "renamed")
    edit_manifest(renamed, lambda m: m["tasks"][0].update(labels=["bad", "good"]))
    code, output = evaluate_([exports / "toy-soft", renamed], toy_files[1])
    assert code == 1 and scored == []
    error = one_error(output)
    assert error.startswith(f"Error: --bundle {renamed}: {toy_files[1]}:")
    assert "is not one of the bundle's labels (bad, good)" in error


def test_a_generation_bundle_is_refused_before_scoring(tiny_build, toy_files, scored, tmp_path):
    chat = write_chat_bundle(tmp_path)
    code, output = evaluate_([tiny_build[0] / "toy-soft", chat], toy_files[1])
    assert code == 1 and scored == []
    assert one_error(output).startswith(f"Error: {chat}: a generation bundle")


def test_every_bundle_is_scored_and_plotted_when_all_is_well(tiny_build, toy_files, scored, tmp_path):
    exports = tiny_build[0]
    chart = tmp_path / "chart.png"
    code, output = evaluate_([exports / "toy-soft", exports / "toy-hard-probe"], toy_files[1], "--plot", chart)
    assert code == 0, output
    assert scored == [exports / "toy-soft", exports / "toy-hard-probe"]
    assert chart.read_bytes().startswith(b"\x89PNG") and str(exports / "toy-hard-probe") in output


@pytest.mark.parametrize("flag", ["--text-column", "--text-b-column"])
def test_eval_refuses_the_label_column_as_a_text_column(tiny_bundle, toy_files, flag):
    code, err, out = pt_run("eval", "--bundle", tiny_bundle, "--data", toy_files[1], flag, "label")
    role = "text" if flag == "--text-column" else "second text"
    assert_one_error_line(code, err, f"the {role} column and the label column are both 'label'")
    assert out == ""


def test_pt_build_refuses_the_label_column_as_the_text_column_before_any_work(tiny_bert, toy_files, tmp_path):
    from ptbundle.builder.cli import cli as build_cli

    train, dev = toy_files
    result = CliRunner().invoke(build_cli, ["export", "--train", str(train), "--dev", str(dev), "--backbone",
                                            str(tiny_bert), "--prompt", "hard", "--head", "probe", "--text-column",
                                            "label", "--out", str(tmp_path / "exports")])
    assert result.exit_code == 1
    assert one_error(result.output).startswith("Error: the text column and the label column are both 'label'")
    assert not (tmp_path / "exports").exists()


def test_a_lone_surrogate_in_a_data_file_names_file_and_line(tiny_bundle, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a great movie", "label": "pos"}\n{"text": "ok \\ud83d", "label": "neg"}\n',
                    encoding="utf-8")
    code, err, _ = pt_run("eval", "--bundle", tiny_bundle, "--data", data)
    assert_one_error_line(code, err, f"{data}:2: 'text' holds a lone surrogate (U+D83D at character 4)")


def test_a_single_bundle_error_names_it(tiny_bundle, tmp_path):
    data = write_tsv(tmp_path / "meh.tsv", [("a great movie", "meh")])
    code, err, _ = pt_run("eval", "--bundle", tiny_bundle, "--data", data)
    assert_one_error_line(code, err, f"--bundle {tiny_bundle}: {data}:2: label 'meh' is not one of the bundle's"
                                     f" labels (neg, pos)")
