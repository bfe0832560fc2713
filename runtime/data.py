"""Datasets: MR with its canonical split, and generic TSV / CSV / JSONL files.

An `Example` is one or two texts and a label string.  Readers report every
malformed row by file and line (`DataError`), never skip it silently.  Both
rooms use this module: the builder trains on it, `pt-run eval` scores on it.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .inputs import lone_surrogate




# The shipped datasets are the package ptbundle.data (the repo's data/ folder, installed with the wheel too).
DATA_DIR = Path(importlib.util.find_spec("ptbundle.data").origin).parent
MR_DIR = DATA_DIR / "mr"
INSTRUCTIONS_DIR = DATA_DIR / "instructions"
MR_LABELS = ("negative", "positive")


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    text_b: str | None = None
    where: str | None = field(default=None, compare=False)  # "file:line", for error messages


@dataclass
class Dataset:
    name: str
    labels: tuple  # label strings; the model's output i is labels[i]
    train: list
    dev: list
    test: list

    def label_ids(self, examples) -> list:
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[e.label] for e in examples]

    @property
    def is_pair(self) -> bool:
        return any(e.text_b is not None for e in self.train)


# --- MR ---------------------------------------------------------------------

def read_mr_file(path: Path) -> list:
    """MR is cp1252; split on "\\n" only (str.splitlines also breaks on U+0085)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    lines = raw.decode("cp1252").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the file
    for i, line in enumerate(lines):
        if not line.strip():
            raise DataError(f"{path}:{i + 1}: empty line")
    return lines


def canonical_split(index: int) -> str:
    """The split every MR figure here uses: i % 10 == 0 test, == 1 dev, else train."""
    return {0: "test", 1: "dev"}.get(index % 10, "train")


def load_mr(directory: Path = MR_DIR) -> Dataset:
    if not Path(directory).is_dir():
        raise DataError(f"{directory}: the MR data is not there (it ships in the project's data/mr/;"
                        f" an installed copy of ptbundle has no data: pass a file instead)")
    splits = {"train": [], "dev": [], "test": []}
    for label in MR_LABELS:
        suffix = "pos" if label == "positive" else "neg"
        for i, line in enumerate(read_mr_file(Path(directory) / f"rt-polarity.{suffix}")):
            splits[canonical_split(i)].append(Example(line.strip(), label))
    return Dataset("mr", MR_LABELS, splits["train"], splits["dev"], splits["test"])


# --- generic files ------------------------------------------------------------

@dataclass(frozen=True)
class Columns:
    text: str = "text"
    label: str = "label"
    text_b: str | None = None

    def __post_init__(self):
        # A model shown its label as its text scores 100.00 and has learnt nothing: refuse it before any work.
        for role, name in (("text", self.text), ("second text", self.text_b)):
            if name is not None and name == self.label:
                raise DataError(f"the {role} column and the label column are both {name!r}: the model would read"
                                f" its answer; name the column holding the {role}")
        if self.text_b is not None and self.text_b == self.text:
            raise DataError(f"the text column and the second text column are both {self.text!r}: a pair needs"
                            f" two columns")


def read_text(path: Path) -> str:
    """A data file's text (UTF-8, a BOM dropped); unreadable or not UTF-8 is a DataError naming file and line."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from e


def read_examples(path, columns: Columns = Columns()) -> list:
    """Read a .tsv, .csv or .jsonl file into Examples."""
    path = Path(path)
    content = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = jsonl_rows(content, path)
    elif suffix in (".tsv", ".csv"):
        rows = delimited_rows(content, path, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unknown format {suffix!r} (use .tsv, .csv or .jsonl)")
    examples = [row_to_example(row, columns, path, line) for line, row in rows]
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def jsonl_rows(content: str, path: Path):
    for n, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def delimited_rows(content: str, path: Path, delimiter: str):
    # QUOTE_NONE for TSV: GLUE-style files contain bare quotes inside texts.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, quoting=quoting)
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty file")
    header = [h.strip() for h in header]
    for row in reader:
        n = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}")
        yield n, dict(zip(header, row))


def row_to_example(row: dict, columns: Columns, path: Path, line: int) -> Example:
    def value(name: str) -> str:
        if name not in row:
            raise DataError(f"{path}:{line}: no column {name!r} (columns: {', '.join(map(str, row))})")
        cell = row[name]
        if cell is None or (isinstance(cell, str) and not cell.strip()):
            raise DataError(f"{path}:{line}: empty {name!r}")
        if isinstance(cell, (dict, list)):
            raise DataError(f"{path}:{line}: {name!r} must be a string or number")
        text = str(cell)
        bad = lone_surrogate(text)  # a lone JSON "\ud83d" escape: no tokenizer takes it
        if bad:
            raise DataError(f"{path}:{line}: {name!r} holds a lone surrogate ({bad}): not valid Unicode text")
        return text.strip()

    text_b = value(columns.text_b) if columns.text_b else None
    return Example(value(columns.text), value(columns.label), text_b, f"{path}:{line}")


def load_files(train, dev, test=None, columns: Columns = Columns()) -> Dataset:
    splits = {"train": read_examples(train, columns), "dev": read_examples(dev, columns)}
    splits["test"] = read_examples(test, columns) if test else []
    labels = tuple(sorted({e.label for e in splits["train"]}))
    if len(labels) < 2:
        raise DataError(f"{train}: needs at least two labels, found {list(labels)}")
    for split in ("dev", "test"):
        for e in splits[split]:
            if e.label not in labels:
                raise DataError(f"{e.where}: label {e.label!r} does not occur in the training file {train}")
    return Dataset(Path(train).stem, labels, splits["train"], splits["dev"], splits["test"])
