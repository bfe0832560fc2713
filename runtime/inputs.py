"""Reading inputs to predict, a chunk at a time: plain text lines or JSON lines.

    text    one text per line; a pair task: the two texts split by one tab
    jsonl   one object per line: {"text": ..., "text_b": ... (pair tasks), "task": ... (multi-task bundles)}

`chunks` reads a file of any size in bounded memory: it yields lists of
`Row`s of at most `chunk_lines` lines, each chunk validated whole before it
is handed out, so a bad line stops the run before any output of its chunk.
Errors name the file and line.  The server (runtime.serve) checks the
fields of a request with the same `check_text`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

FORMATS = ("text", "jsonl")
CHUNK_LINES = 4096  # lines validated, sorted by length and predicted together
# A UTF-16 surrogate alone: JSON's "\ud83d" escape decodes to one, and so do the undecodable bytes of a command
# line; no tokenizer takes it and no UTF-8 output can hold it.
SURROGATE = re.compile("[\ud800-\udfff]")
BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark: some editors start a file with it


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line number in the input
    text: str
    text_b: str | None
    task: str  # a task of the bundle


def check_text(value, field: str) -> str | None:
    """What is wrong with a text field's value (None if nothing)."""
    if not isinstance(value, str):
        return f"{field} must be a string, not {type(value).__name__}"
    if not value.strip():
        return f"{field} is empty"
    bad = lone_surrogate(value)
    if bad:
        return f"{field} holds a lone surrogate ({bad}): not valid Unicode text"
    return None


def lone_surrogate(text: str) -> str | None:
    """Where `text` holds a lone surrogate ('U+D83D at character 4'), or None."""
    found = SURROGATE.search(text)
    return None if found is None else f"U+{ord(found.group()):04X} at character {found.start() + 1}"


def format_of(name: str) -> str:
    """The input format a file's name implies: jsonl for a .jsonl file (in any case: REQ.JSONL too), else text."""
    return "jsonl" if Path(name).suffix.lower() == ".jsonl" else "text"


class LineReader:
    """Turns raw lines into Rows for one bundle; `task` (--task) is every line's task: a line may repeat it, not
    name another (a silent override would predict with a task the user did not ask for)."""

    def __init__(self, tasks: dict, fmt: str, task: str | None):
        # tasks: name -> pair (bool)
        self.tasks, self.fmt, self.default, self.given = tasks, fmt, task, task
        if task is not None and task not in tasks:
            raise InputError(f"--task {task!r}: the bundle has no such task (it has {', '.join(tasks)})")
        if task is None and len(tasks) == 1:
            self.default = next(iter(tasks))

    def row(self, number: int, raw: bytes) -> Row:
        """One line as a Row; a ValueError says what is wrong with it."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"not valid UTF-8 (byte {e.start + 1})") from None
        if not line.strip():
            raise ValueError("empty line")
        return self.json_row(number, line) if self.fmt == "jsonl" else self.text_row(number, line)

    def task_of(self, name) -> str:
        if name is None:
            if self.default is None:
                raise ValueError(f"no task: this bundle has several ({', '.join(self.tasks)}); give --task or a"
                                 f" \"task\" field")
            return self.default
        if not isinstance(name, str) or name not in self.tasks:
            raise ValueError(f"unknown task {name!r} (the bundle has {', '.join(self.tasks)})")
        if self.given is not None and name != self.given:
            raise ValueError(f"field 'task' is {name!r} but --task is {self.given!r} (a line may only repeat --task;"
                             f" leave --task out to take each line's)")
        return name

    def text_row(self, number: int, line: str) -> Row:
        task = self.task_of(None)
        if not self.tasks[task]:
            return Row(number, line, None, task)
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError("expected two texts separated by one tab (a sentence-pair task)")
        return Row(number, parts[0], parts[1], task)

    def json_row(self, number: int, line: str) -> Row:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        unknown = set(obj) - {"text", "text_b", "task"}
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))} (fields: text, text_b, task)")
        task = self.task_of(obj.get("task"))
        if "text" not in obj:
            raise ValueError("missing field 'text'")
        problem = check_text(obj["text"], "field 'text'")
        if problem:
            raise ValueError(problem)
        text_b = obj.get("text_b")
        if self.tasks[task]:
            problem = "missing field 'text_b' (a sentence-pair task)" if text_b is None else \
                check_text(text_b, "field 'text_b'")
            if problem:
                raise ValueError(problem)
        elif text_b is not None:
            raise ValueError(f"field 'text_b': task {task!r} takes one text")
        return Row(number, obj["text"], text_b, task)


def chunks(stream, name: str, reader: LineReader, chunk_lines: int = CHUNK_LINES):
    """Yield lists of Rows, `chunk_lines` lines at a time, each checked whole; a bad line raises InputError.

    Lines end with \\n only (a \\r before it is dropped), so a text may hold any
    other character.  A final newline ends the last line; it does not start an
    empty one.  A UTF-8 BOM before the first line is dropped.
    """
    rows, problems, number, seen = [], [], 0, 0
    for number, raw in enumerate(stream, start=1):
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        if number == 1:
            raw = raw.removeprefix(BOM)  # an editor's mark of UTF-8 (Notepad writes one), not the text's
        try:
            rows.append(reader.row(number, raw))
        except ValueError as e:
            problems.append(f"{name}:{number}: {e}")
        if number % chunk_lines == 0:
            check(problems, seen)
            yield rows
            seen, rows = number, []
    check(problems, seen)
    if rows:
        yield rows
    elif number == 0:
        raise InputError(f"{name}: no input lines")


def check(problems: list, written: int) -> None:
    if not problems:
        return
    shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
    before = f"lines 1-{written} were predicted and written, nothing after them" if written else \
        "nothing was predicted"
    raise InputError(f"{len(problems)} input line(s) cannot be used ({before}):\n  {shown}")
