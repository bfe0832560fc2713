"""The two commands as a user runs them: pt-run predict / info, and pt-build's errors."""

import json
import os

import pytest
from click.testing import CliRunner

from ptbundle.builder.cli import cli as build_cli
from ptbundle.runtime.cli import cli as run_cli


def run(args, input=None):
    return CliRunner().invoke(run_cli, args, input=input)


def test_predict_prints_one_result_per_line_in_order(tiny_bundle, tmp_path):
    texts = [("a great movie", "the worst film ever")[i % 2] + f" {i}" for i in range(1000)]
    f = tmp_path / "in.txt"
    f.write_text("\n".join(texts) + "\n", encoding="utf-8")
    result = run(["predict", str(f), "--bundle", str(tiny_bundle), "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts
    assert {r["label"] for r in rows} <= {"neg", "pos"}
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


def test_predict_streams_in_chunks_with_the_same_results(tiny_bundle, tmp_path):
    texts = [f"a great movie {i}" if i % 3 else f"the worst film ever , boring acting {i}" for i in range(50)]
    f = tmp_path / "in.txt"
    f.write_text("\n".join(texts) + "\n", encoding="utf-8")
    whole = run(["predict", str(f), "--bundle", str(tiny_bundle), "--format", "jsonl"])
    chunked = run(["predict", str(f), "--bundle", str(tiny_bundle), "--format", "jsonl", "--chunk-lines", "7",
                   "--batch-size", "3"])
    assert whole.exit_code == 0 and chunked.exit_code == 0, chunked.output
    a, b = ([json.loads(line) for line in r.stdout.splitlines()] for r in (whole, chunked))
    assert [r["text"] for r in b] == texts
    for x, y in zip(a, b):  # a line's result does not depend on the chunk or batch it ran in
        assert x["label"] == y["label"] and x["probabilities"] == pytest.approx(y["probabilities"], abs=1e-5)


def test_a_bad_line_stops_the_run_after_the_chunks_before_it(tiny_bundle, tmp_path):
    f = tmp_path / "in.txt"
    f.write_bytes(b"".join(b"line %d\n" % i for i in range(1, 10)) + b"\n" + b"line 11\n")  # line 10 is empty
    result = run(["predict", str(f), "--bundle", str(tiny_bundle), "--chunk-lines", "4"])
    assert result.exit_code == 1
    assert "in.txt:10: empty line" in result.output and "lines 1-8 were predicted and written" in result.output
    assert [line.rsplit("\t", 1)[1] for line in result.stdout.splitlines()] == [f"line {i}" for i in range(1, 9)]


@pytest.mark.parametrize("line, expected", [
    ('{"text": "a", "task": "nope"}', "unknown task 'nope'"),
    ('{"txt": "a"}', "unknown field(s) txt"),
    ('{"text": 3}', "field 'text' must be a string"),
    ('{"text": "a", "text_b": "b"}', "field 'text_b': task 'toy-soft' takes one text"),  # named after its bundle
    ('["a"]', "not a JSON object"),
    ('{"text": "a"', "not valid JSON"),
], ids=["task", "field", "type", "pair", "array", "json"])
def test_jsonl_input_errors_name_the_line(tiny_bundle, line, expected):
    result = run(["predict", "-", "--bundle", str(tiny_bundle), "--input-format", "jsonl"],
                 input='{"text": "a great movie"}\n' + line + "\n")
    assert result.exit_code == 1 and f"<stdin>:2: {expected}" in result.output and result.stdout == ""


def test_predict_text_format_and_stdin(tiny_bundle):
    result = run(["predict", "-", "--bundle", str(tiny_bundle)], input="a great movie\nthe worst film\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("\ta great movie") and lines[1].split("\t")[0] in ("neg", "pos")


def test_empty_and_undecodable_lines_are_reported_not_dropped(tiny_bundle, tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine\n\nalso fine\nbroken \xff\n")
    result = run(["predict", str(f), "--bundle", str(tiny_bundle)])
    assert result.exit_code != 0
    assert "bad.txt:2: empty line" in result.output
    assert "bad.txt:4: not valid UTF-8" in result.output
    assert "fine" not in result.stdout  # nothing half-printed


def test_empty_input_is_an_error(tiny_bundle):
    result = run(["predict", "-", "--bundle", str(tiny_bundle)], input="")
    assert result.exit_code != 0 and "no input lines" in result.output


@pytest.fixture(scope="module")
def pair_bundle(tmp_path_factory, tiny_roberta):
    d = tmp_path_factory.mktemp("pairs")
    rows = [("a great movie", "the best film", "1"), ("a great movie", "the worst film", "0")] * 8
    for split in ("train", "dev"):
        (d / f"{split}.tsv").write_text("s1\ts2\tq\n" + "".join("\t".join(r) + "\n" for r in rows))
    result = build(["--train", str(d / "train.tsv"), "--dev", str(d / "dev.tsv"), "--text-column", "s1",
                    "--text-b-column", "s2", "--label-column", "q", "--backbone", str(tiny_roberta),
                    "--virtual-tokens", "2", "--batch-size", "8", "--template", "{text} ? {text_b}",
                    "--name", "pairs"], d)
    assert result.exit_code == 0, result.output
    return d / "exports"


@pytest.mark.parametrize("name", ["pairs-soft", "pairs-hard-zeroshot", "pairs-hard-probe"])
def test_sentence_pair_bundles_end_to_end(pair_bundle, name):
    import json as _json

    bundle = pair_bundle / name
    manifest = _json.loads((bundle / "manifest.json").read_text())["tasks"][0]
    assert manifest["pair"] is True and manifest["labels"] == ["0", "1"]
    assert manifest["template"] == (None if name == "pairs-soft" else "{text} ? {text_b}")
    result = run(["predict", "-", "--bundle", str(bundle), "--format", "jsonl"],
                 input="a great movie\tthe best film\nthe plot\tthe story\n")
    assert result.exit_code == 0, result.output
    rows = [_json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["text"], r["text_b"]) for r in rows] == [("a great movie", "the best film"), ("the plot", "the story")]
    bad = run(["predict", "-", "--bundle", str(bundle)], input="only one text\n")
    assert bad.exit_code != 0 and "<stdin>:1: expected two texts separated by one tab" in bad.output
    scored = run(["eval", "--bundle", str(bundle), "--data", str(pair_bundle.parent / "dev.tsv"),
                  "--text-column", "s1", "--text-b-column", "s2", "--label-column", "q", "--json"])
    assert scored.exit_code == 0, scored.output
    assert _json.loads(scored.stdout)["results"][0]["accuracy"] == pytest.approx(manifest["metrics"]["dev"]["accuracy"])


def test_predict_names_a_missing_bundle(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("hello\n")
    result = run(["predict", str(f), "--bundle", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "no such bundle directory" in result.output


def test_info_shows_the_manifest(tiny_bundle):
    result = run(["info", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    for expected in ("soft prompt bundle", "labels      neg, pos", "4 virtual tokens", "dev ", "model.mindir"):
        assert expected in result.stdout


def build(args, tmp_path):
    return CliRunner().invoke(build_cli, ["export", "--out", str(tmp_path / "exports"), *args])


def test_build_reports_a_malformed_row_and_writes_nothing(tmp_path, tiny_bert, toy_files):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\ngood film\tpos\nno label\n")
    result = build(["--train", str(bad), "--dev", str(toy_files[1]), "--backbone", str(tiny_bert)], tmp_path)
    assert result.exit_code != 0
    assert "Error: " in result.output and "bad.tsv:3: 1 fields, the header has 2" in result.output
    assert not (tmp_path / "exports").exists() or os.listdir(tmp_path / "exports") == []


def test_build_reports_a_bad_backbone(tmp_path, toy_files):
    (tmp_path / "ckpt").mkdir()
    result = build(["--train", str(toy_files[0]), "--dev", str(toy_files[1]), "--backbone", str(tmp_path / "ckpt")],
                   tmp_path)
    assert result.exit_code == 1 and "missing config.json" in result.output


def test_build_needs_train_and_dev_together(tmp_path, toy_files):
    result = build(["--train", str(toy_files[0])], tmp_path)
    assert result.exit_code == 2 and "--train and --dev go together" in result.output
