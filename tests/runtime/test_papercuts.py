"""Papercuts of issue 28, each through the real commands on real bundles.

10. `pt-run info`: every block starts with its heading; int8 figures only beside an int8 graph; a decoder's
    recipe shows the pooling its graph does, not the --pooling it ignored.
12. Options not silently ignored: extensions in any case, `--task` a bundle lacks, a JSONL line's `task` against
    `--task`, a UTF-8 BOM before the first line.

`pt-run` runs in-process (click's runner on ptbundle.runtime.cli:cli), or as a real process where stdin matters.
"""

import json

import pytest
from click.testing import CliRunner

from checkpoints import write_llama_checkpoint
from conftest import build, toy_rows, write_tsv
from helpers import assert_one_error_line, pt_run, write_chat_bundle
from ptbundle.runtime.cli import cli

BOM = b"\xef\xbb\xbf"


def run(*args, stdin=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=stdin)


def refused(result, *expected):
    """One `Error: ` line holding every `expected` text, exit 1, nothing on stdout."""
    assert_one_error_line(result.exit_code, result.stderr, *expected)
    assert result.stdout == "", result.stdout


def refused_line(result, where_what: str):
    """pt-run predict's refusal of input lines (runtime.inputs.check): nothing predicted, the line named."""
    assert result.exit_code == 1 and result.stdout == "", result.output
    assert result.stderr.startswith("Error: 1 input line(s) cannot be used (nothing was predicted):\n"), result.stderr
    assert f"\n  {where_what}" in result.stderr, result.stderr


def task_name(bundle) -> str:
    return json.loads((bundle / "manifest.json").read_text())["tasks"][0]["name"]


def predicted(result) -> list:
    """The output objects of `pt-run predict --format jsonl`."""
    assert result.exit_code == 0, result.output + repr(result.exception)
    return [json.loads(line) for line in result.stdout.splitlines()]


# --- 10. pt-run info ------------------------------------------------------------------------------------------------

def blocks(stdout: str) -> list:
    """info's output as [heading, [its lines]]; every line before the first heading is a block of its own."""
    out = []
    for line in stdout.splitlines():
        if not line.startswith(" ") or not out:
            out.append([line, []])
        else:
            out[-1][1].append(line)
    return out


def test_info_starts_each_block_with_its_heading(tiny_bundle):
    result = run("info", tiny_bundle)
    assert result.exit_code == 0, result.output
    (heading, lines), = blocks(result.stdout)  # one block: the bundle's, its task's lines in it
    assert heading.startswith(f"{tiny_bundle}: soft prompt bundle")
    assert lines[0].startswith("  backbone    ")
    assert any(line.startswith("  labels      ") for line in lines)


def test_merged_info_has_a_bundle_block_then_a_block_per_task(merged_bundle):
    out, _ = merged_bundle
    result = run("info", out)
    assert result.exit_code == 0, result.output
    (heading, lines), *tasks = blocks(result.stdout)
    names = ["sentiment", "zeroshot", "probe", "pairs", "prefix", "prefix1", "late"]
    assert heading == f"{out}: multi-task bundle, 7 tasks in one graph: {', '.join(names)}"
    assert lines[0].startswith("  backbone    ")
    for shared in ("  parity ", "  created ", "  versions ", "  files"):  # the bundle's lines, under its heading
        assert any(line.startswith(shared) for line in lines), shared
    assert [h.split(":")[0] for h, _ in tasks] == [f"task {name}" for name in names]
    for heading, lines in tasks:
        assert lines[0].startswith("  labels      "), heading
        assert not any(line.startswith(("  backbone", "  files", "  created")) for line in lines), heading


def test_int8_figures_only_beside_an_int8_graph(merged_bundle, tiny_bundle):
    out, sources = merged_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert "model.int8.onnx" not in manifest["files"]
    assert any("int8" in t["metrics"] for t in manifest["tasks"])  # carried over from the int8 source bundles
    merged = run("info", out)
    assert merged.exit_code == 0, merged.output
    assert "int8" not in merged.stdout
    # A bundle with its int8 graph shows them (the probe source of the merged bundle, and tiny_bundle).
    for bundle in (sources["probe"], tiny_bundle):
        own = run("info", bundle)
        assert own.exit_code == 0 and "model.int8.onnx" in own.stdout, own.output
        assert "  int8 dev    accuracy " in own.stdout and "  int8 test   accuracy " in own.stdout


@pytest.fixture(scope="module")
def decoder_probe(tmp_path_factory):
    """A hard-prompt probe bundle on a tiny Llama, built by the real pt-build with the recipe's default --pooling
    (mean), which a decoder does not use: it reads the last token."""
    root = tmp_path_factory.mktemp("decoder-probe")
    train = write_tsv(root / "train.tsv", toy_rows(16))
    out, llama = root / "exports", write_llama_checkpoint(root / "llama")
    build(["export", "--train", str(train), "--dev", str(train), "--backbone", str(llama),
           "--prompt", "hard", "--head", "probe", "--epochs", "1", "--max-length", "64",
           "--template", "review: {text} it was", "--out", str(out), "--name", "toyp"])
    return next(out.rglob("manifest.json")).parent


def test_a_decoders_recipe_shows_the_pooling_its_graph_does(decoder_probe):
    task = json.loads((decoder_probe / "manifest.json").read_text())["tasks"][0]
    assert (task["pooling"], task["recipe"]["pooling"]) == ("last", "mean")  # what the builder records
    result = run("info", decoder_probe)
    assert result.exit_code == 0, result.output
    prompt, = [line for line in result.stdout.splitlines() if line.startswith("  prompt ")]
    recipe, = [line for line in result.stdout.splitlines() if line.startswith("  recipe ")]
    assert "last pooling" in prompt
    assert "pooling=last (--pooling mean not used)" in recipe
    assert "pooling=mean" not in result.stdout


def test_an_encoders_recipe_shows_its_pooling_as_given(tiny_bundle):
    result = run("info", tiny_bundle)
    recipe, = [line for line in result.stdout.splitlines() if line.startswith("  recipe ")]
    assert "pooling=mean," in recipe and "not used" not in recipe


# --- 12. options not silently ignored ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["REQ.JSONL", "req.Jsonl", "req.jsonl"])
def test_a_jsonl_file_is_json_lines_in_any_case(tiny_bundle, tmp_path, name):
    f = tmp_path / name
    f.write_text('{"text": "a great movie"}\n{"text": "the worst film ever"}\n', encoding="utf-8")
    rows = predicted(run("predict", f, "--bundle", tiny_bundle, "--format", "jsonl"))
    assert [r["text"] for r in rows] == ["a great movie", "the worst film ever"]


def test_other_names_are_text_lines(tiny_bundle, tmp_path):
    f = tmp_path / "REQ.TXT"
    f.write_text('{"text": "a great movie"}\n', encoding="utf-8")
    rows = predicted(run("predict", f, "--bundle", tiny_bundle, "--format", "jsonl"))
    assert [r["text"] for r in rows] == ['{"text": "a great movie"}']


@pytest.mark.parametrize("name", ["DEV.TSV", "Dev.Csv", "DEV.JSONL"])
def test_eval_reads_data_files_in_any_case(tiny_bundle, tmp_path, name):
    f = tmp_path / name
    rows = [("a great movie", "pos"), ("the worst film ever", "neg")]
    if name.lower().endswith(".jsonl"):
        f.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows), encoding="utf-8")
    else:
        sep = "\t" if name.lower().endswith(".tsv") else ","
        f.write_text("".join(f"{t}{sep}{l}\n" for t, l in [("text", "label"), *rows]), encoding="utf-8")
    result = run("eval", "--bundle", tiny_bundle, "--data", f, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 2


def test_eval_refuses_a_task_a_one_task_bundle_lacks(tiny_bundle, toy_files):
    name = task_name(tiny_bundle)
    result = run("eval", "--bundle", tiny_bundle, "--data", toy_files[1], "--task", "foo")
    refused(result, f"--bundle {tiny_bundle}: --task 'foo': the bundle has no such task (it has {name})")
    named = run("eval", "--bundle", tiny_bundle, "--data", toy_files[1], "--task", name, "--json")
    assert named.exit_code == 0, named.output  # its own task's name is fine


def test_eval_refuses_a_task_one_of_its_bundles_lacks(merged_bundle, tiny_bundle, toy_files):
    out, _ = merged_bundle
    result = run("eval", "--bundle", out, "--bundle", tiny_bundle, "--data", toy_files[1], "--task", "sentiment")
    refused(result, f"--bundle {tiny_bundle}: --task 'sentiment': the bundle has no such task")


def test_predict_refuses_a_task_a_one_task_bundle_lacks(tiny_bundle, tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("a great movie\n", encoding="utf-8")
    refused(run("predict", f, "--bundle", tiny_bundle, "--task", "foo"),
            f"--task 'foo': the bundle has no such task (it has {task_name(tiny_bundle)})")


def write_lines(path, *objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return path


def test_a_lines_task_may_not_differ_from_the_task_option(merged_bundle, tmp_path):
    out, _ = merged_bundle
    f = write_lines(tmp_path / "req.jsonl", {"text": "a great movie", "task": "sentiment"},
                    {"text": "the worst film ever", "task": "probe"})
    refused_line(run("predict", f, "--bundle", out, "--task", "sentiment"),
                 f"{f}:2: field 'task' is 'probe' but --task is 'sentiment'")
    # Repeating --task, or naming none, is its task; without --task each line names its own.
    same = write_lines(tmp_path / "same.jsonl", {"text": "a great movie", "task": "sentiment"}, {"text": "great"})
    rows = predicted(run("predict", same, "--bundle", out, "--task", "sentiment", "--format", "jsonl"))
    assert [r["task"] for r in rows] == ["sentiment", "sentiment"]
    rows = predicted(run("predict", f, "--bundle", out, "--format", "jsonl"))
    assert [r["task"] for r in rows] == ["sentiment", "probe"]


def test_a_one_task_bundles_lines_may_repeat_its_task(tiny_bundle, tmp_path):
    name = task_name(tiny_bundle)
    f = write_lines(tmp_path / "req.jsonl", {"text": "a great movie", "task": name})
    assert len(predicted(run("predict", f, "--bundle", tiny_bundle, "--task", name, "--format", "jsonl"))) == 1


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_a_bom_before_the_first_line_is_not_text(tiny_bundle, tmp_path, fmt):
    lines = [b"a great movie", "the worst \ufefffilm".encode()]  # U+FEFF inside a text is the text's own
    if fmt == "jsonl":
        lines = [json.dumps({"text": t.decode()}, ensure_ascii=False).encode() for t in lines]
    f = tmp_path / f"in.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    f.write_bytes(BOM + b"\n".join(lines) + b"\n")
    rows = predicted(run("predict", f, "--bundle", tiny_bundle, "--format", "jsonl"))
    assert [r["text"] for r in rows] == ["a great movie", "the worst \ufefffilm"]
    plain = run("predict", f, "--bundle", tiny_bundle)
    assert plain.exit_code == 0 and "\ufeff" not in plain.stdout.splitlines()[0], plain.output


def test_a_bom_on_stdin_is_not_text(tiny_bundle):
    code, err, out = pt_run("predict", "-", "--bundle", tiny_bundle, "--format", "jsonl",
                            stdin=BOM + b"a great movie\n")
    assert code == 0, err
    assert json.loads(out)["text"] == "a great movie"


def test_a_bom_before_a_generate_prompt_is_not_prompt(tmp_path, monkeypatch):
    from ptbundle.runtime.bundle import Bundle

    prompts = []
    real = Bundle.generate

    def recording(self, prompt, *args, **kwargs):  # the prompt the command hands the real generate
        prompts.append(prompt)
        return real(self, prompt, *args, **kwargs)

    monkeypatch.setattr(Bundle, "generate", recording)
    chat = write_chat_bundle(tmp_path)
    for stdin in (BOM + b"hello\n", b"hello\n"):
        result = run("generate", chat, "-", "--max-new-tokens", 2, stdin=stdin)
        assert result.exit_code == 0, result.output + repr(result.exception)
    assert prompts == ["hello", "hello"]
