"""Datasets: MR's canonical split and generic files, with errors that name file and line."""

import json

import pytest

from conftest import write_tsv
from ptbundle.runtime.data import MR_DIR, Columns, load_files, load_mr, read_examples, read_mr_file
from ptbundle.runtime.data import DataError


def test_mr_canonical_split_sizes_and_labels():
    mr = load_mr()
    assert (len(mr.train), len(mr.dev), len(mr.test)) == (8528, 1066, 1068)
    assert mr.labels == ("negative", "positive")
    assert sum(e.label == "positive" for e in mr.test) == 534
    # line 0 of each file is test, line 1 dev, line 2 train
    pos = read_mr_file(MR_DIR / "rt-polarity.pos")
    first = {split: next(e.text for e in getattr(mr, split) if e.label == "positive") for split in ("test", "dev", "train")}
    assert first == {"test": pos[0].strip(), "dev": pos[1].strip(), "train": pos[2].strip()}


def test_mr_is_decoded_as_cp1252_and_split_on_newline_only():
    lines = read_mr_file(MR_DIR / "rt-polarity.pos") + read_mr_file(MR_DIR / "rt-polarity.neg")
    assert len(lines) == 10662  # str.splitlines() would give more: cp1252 0x85 is U+2026 here, not NEL
    assert any("\u2026" in line or "\u00e9" in line for line in lines)


def test_mr_empty_line_is_reported(tmp_path):
    (tmp_path / "rt-polarity.pos").write_bytes(b"good\n\nfine\n")
    (tmp_path / "rt-polarity.neg").write_bytes(b"bad\n")
    with pytest.raises(DataError, match=r"rt-polarity.pos:2: empty line"):
        load_mr(tmp_path)


def test_tsv_csv_jsonl_read_the_same(tmp_path):
    rows = [("a good film", "pos"), ('he said "no", twice', "neg")]
    write_tsv(tmp_path / "d.tsv", rows)
    (tmp_path / "d.csv").write_text('text,label\na good film,pos\n"he said ""no"", twice",neg\n')
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "label": l}) for t, l in rows) + "\n")
    expected = [(t, l) for t, l in rows]
    for name in ("d.tsv", "d.csv", "d.jsonl"):
        assert [(e.text, e.label) for e in read_examples(tmp_path / name)] == expected, name


def test_pairs_and_custom_columns(tmp_path):
    write_tsv(tmp_path / "p.tsv", [("1", "a cat", "the cat")], header=("Quality", "#1 String", "#2 String"))
    (e,) = read_examples(tmp_path / "p.tsv", Columns(text="#1 String", text_b="#2 String", label="Quality"))
    assert (e.text, e.text_b, e.label) == ("a cat", "the cat", "1")


def test_utf8_bom_in_header_is_ignored(tmp_path):
    (tmp_path / "b.tsv").write_bytes("\ufefftext\tlabel\nfine\tpos\n".encode("utf-8"))
    assert read_examples(tmp_path / "b.tsv")[0].text == "fine"


@pytest.mark.parametrize("name, content, message", [
    ("f.tsv", "text\tlabel\nok\tpos\nno label here\n", r"f.tsv:3: 1 fields, the header has 2"),
    ("f.tsv", "text\tlabel\nok\tpos\n \tneg\n", r"f.tsv:3: empty 'text'"),
    ("f.tsv", "sentence\tlabel\nok\tpos\n", r"f.tsv:2: no column 'text'"),
    ("f.jsonl", '{"text": "ok", "label": "pos"}\n{"text": "ok"\n', r"f.jsonl:2: not valid JSON"),
    ("f.jsonl", '{"text": "ok", "label": "pos"}\n["ok", "pos"]\n', r"f.jsonl:2: expected a JSON object"),
    ("f.jsonl", '{"text": "ok"}\n', r"f.jsonl:1: no column 'label'"),
    ("f.txt", "ok\n", r"unknown format '.txt'"),
    ("f.tsv", "", r"f.tsv: empty file"),
])
def test_malformed_rows_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_examples(tmp_path / name)


def test_invalid_utf8_names_the_line(tmp_path):
    (tmp_path / "u.tsv").write_bytes(b"text\tlabel\nok\tpos\nbad \xff byte\tneg\n")
    with pytest.raises(DataError, match=r"u.tsv:3: not valid UTF-8"):
        read_examples(tmp_path / "u.tsv")


def test_dev_label_unknown_to_train_is_an_error(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("a", "pos"), ("b", "neg")])
    dev = write_tsv(tmp_path / "dev.tsv", [("c", "pos"), ("d", "neutral")])
    with pytest.raises(DataError, match=r"dev.tsv:3: label 'neutral' does not occur in the training file"):
        load_files(train, dev)
