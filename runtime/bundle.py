"""Load a bundle directory and predict with it.

    from ptbundle.runtime import Bundle
    bundle = Bundle.load("exports/mr-soft")
    bundle.predict(["a gorgeous, witty film"])  # -> [Prediction(label="positive", ...)]

A generation bundle (runtime.format: a decoder and its prompt cache) loads
the same way and generates instead: `bundle.generate(prompt)` (runtime.generate).

Two backends run the same folded graph: onnxruntime (`model.onnx`, the
default on CPU: light to install, quick to start) and MindSpore
(`model.mindir`, the default on GPU and Ascend); a generation bundle's
decoder likewise (`decoder.onnx`, or `decoder.mindir` over a static cache).  Nothing here imports the
builder; MindSpore is imported only when its backend is used.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backends, tuning
from .errors import BundleError, InputError, TemplateError
from .format import (DECODER_GRAPHS, MANIFEST, PROMPT, PROMPT_CACHE, TOKENIZER, Manifest, Task, read_tables,
                     verify_files)
from .inputs import check_text
from .generate import Generator, read_prompt_cache
from .template import Template
from .text import batch_indices, encode, load_tokenizer, pad


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict  # label -> probability
    task: str | None = None  # set by a multi-task bundle

    def to_dict(self) -> dict:
        out = {"label": self.label, "probabilities": self.probabilities}
        return {"task": self.task, **out} if self.task is not None else out


@dataclass(frozen=True)
class TaskInput:
    """How one task's inputs become the graph's: its tokenizer (truncating at its max_length) and template."""

    index: int  # the graph's task id (position in the manifest's tasks)
    task: Task
    tokenizer: object
    template: object  # runtime.template.Template, or None for a soft prompt


class Bundle:
    def __init__(self, directory: Path, manifest: Manifest, model, tokenizer_path: Path, generator=None,
                 tokenizers: dict | None = None):
        self.directory = directory
        self.manifest = manifest
        self.model = model
        self.generator = generator  # runtime.generate.Generator of a generation bundle (model is None then)
        # one per max_length: truncation is a setting of the tokenizer (`tokenizers`: shared with other bundles of
        # the same tokenizer file, runtime.store)
        tokenizers = {} if tokenizers is None else tokenizers
        self.tasks = {}
        for i, task in enumerate(manifest.tasks):
            if task.max_length not in tokenizers:
                tokenizers[task.max_length] = load_tokenizer(tokenizer_path, task.max_length)
            self.tasks[task.name] = TaskInput(i, task, tokenizers[task.max_length],
                                              read_template(task, directory, i))

    @classmethod
    def load(cls, path, device: str = "CPU", backend: str | None = None, int8: bool = False,
             verify: bool = True, precision: str | None = None) -> "Bundle":
        """Open a bundle; backend defaults to onnxruntime on CPU, MindSpore elsewhere, OpenVINO for bf16
        (runtime.backends).  `precision`: "fp32" (the default), "int8" (as int8=True) or "bf16"."""
        directory = Path(path)
        precision = precision or ("int8" if int8 else "fp32")
        int8 = precision == "int8"
        runner = backends.get(backend, device, precision)
        if not directory.is_dir():
            raise BundleError(f"{directory}: no such bundle directory")
        manifest = Manifest.read(directory)
        if manifest.generative:
            return cls.load_generation(directory, manifest, device, runner, precision, verify)
        graph = runner.graph_file(precision)
        if graph not in manifest.files:
            hint = ("" if not int8 else " (merge it with pt-build merge --quantize int8)" if manifest.multi_task
                    else " (build it with pt-build export --quantize int8)")
            raise BundleError(f"{directory}: this bundle has no {graph}{hint}")
        tables = None
        if manifest.multi_task:  # its task tables feed the graph (runtime.format): checked before they are read
            if verify:
                verify_files(directory, manifest, [PROMPT])
            tables = read_tables(directory / PROMPT)
        with ThreadPoolExecutor(1) as pool:
            # Hash what this process reads (the other graphs may be large and
            # unused) on a second thread while the graph loads: hashlib lets go
            # of the GIL, and a cold start is mostly these two.
            check = pool.submit(verify_files, directory, manifest, [TOKENIZER, graph]) if verify else None
            try:
                model = open_tuned(runner, directory / graph, device, tables, manifest, precision)
                check_width(directory, manifest, model, graph)
                bundle = cls(directory, manifest, model, directory / TOKENIZER)
            except Exception:
                if check is not None:
                    check.result()  # a missing or altered file explains the failure best
                raise
            if check is not None:
                check.result()  # a mismatch raises here, before the bundle is handed out
        return bundle

    @classmethod
    def load_generation(cls, directory: Path, manifest: Manifest, device: str, runner, precision: str,
                        verify: bool) -> "Bundle":
        task = manifest.only
        graph = runner.graph_file(precision, generative=True)
        for name in (graph, PROMPT_CACHE):
            if name not in manifest.files:
                hint = {DECODER_GRAPHS["onnx-int8"]: " (build it with int8 quantization)",
                        DECODER_GRAPHS["mindir"]: " (it was built before generation bundles had one: rebuild it"
                                                  " with this version's pt-build, or use backend='onnxruntime')"}
                raise BundleError(f"{directory}: this bundle has no {name}{hint.get(name, '')}")
        if verify:  # the prompt cache and tokenizer are small: hash them first, the graph while it loads
            verify_files(directory, manifest, [PROMPT_CACHE, TOKENIZER])
        with ThreadPoolExecutor(1) as pool:
            check = pool.submit(verify_files, directory, manifest, [graph]) if verify else None
            try:
                session = runner.open_decoder(directory / graph, device, read_prompt_cache(directory / PROMPT_CACHE),
                                              task.generation)
            except Exception:
                if check is not None:
                    check.result()  # a missing or altered file explains the failure best
                raise
            if check is not None:
                check.result()
        # No truncation: a prompt longer than the context is an error (Generator.check), not silently cut.
        tokenizer = load_tokenizer(directory / TOKENIZER, task.max_length)
        tokenizer.no_truncation()
        return cls(directory, manifest, None, directory / TOKENIZER, Generator(session, tokenizer, task))

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop=(), stream: bool = False, callback=None):
        """Text generated after `prompt` (a generation bundle only).

        Greedy at temperature 0; else sampled (nucleus `top_p`), reproducibly for a given `seed`.  Stops at
        an eos token, at any of the `stop` strings (not included in the text) or after max_new_tokens.
        Returns a runtime.generate.Generation (.text, .token_ids, .finish_reason); `callback(piece)` sees
        each piece of text as it comes.  With stream=True, returns an iterator of the pieces instead.
        Bad arguments and a prompt beyond the context raise InputError before any work.
        """
        if self.generator is None:
            raise BundleError(f"{self.directory}: a {self.manifest.kind_label} classifier bundle: it predicts"
                              f" labels (predict), it does not generate text")
        if stream:
            return self.generator.stream(prompt, max_new_tokens, temperature, top_p, seed, stop)
        return self.generator.generate(prompt, max_new_tokens, temperature, top_p, seed, stop, callback)

    def no_labels(self) -> None:
        if self.generator is not None:
            raise BundleError(f"{self.directory}: a generation bundle: it generates text (generate), it has no"
                              f" labels to predict")

    @property
    def task_names(self) -> list:
        return list(self.tasks)

    @property
    def labels(self) -> list:
        """The labels of a single-task bundle (labels_of(task) for any)."""
        return self.labels_of(None)

    def labels_of(self, task: str | None) -> list:
        return list(self.manifest.task(task).labels)

    @property
    def is_pair(self) -> bool:
        """A single-task bundle whose inputs are sentence pairs."""
        return self.manifest.only.pair

    def row_tasks(self, task, n: int) -> list:
        """`task` (None for the only one, a name, or a name per row) as one TaskInput per row."""
        if task is None or isinstance(task, str):
            return [self.tasks[self.manifest.task(task).name]] * n
        names = list(task)
        if len(names) != n:
            raise InputError(f"{n} texts but {len(names)} tasks")
        return [self.tasks[self.manifest.task(name).name] for name in names]

    def logits(self, texts, texts_b=None, batch_size: int = 64, sort_by_length: bool = True,
               task=None) -> np.ndarray:
        """Logits [len(texts), labels] in input order.

        `texts` and `texts_b` as for `predict` (a bare string is one text: one row).
        `task`: a task name for every row, or one name per row (a multi-task
        bundle runs rows of different tasks in the same batches); None for a
        single-task bundle.  The array is as wide as the widest of the rows'
        tasks; a row whose task has fewer labels is NaN beyond them.
        Batches group texts of similar length (less padding) unless
        `sort_by_length=False`, which runs consecutive texts together.
        """
        return self._run(texts, texts_b, batch_size, sort_by_length, task)[1]

    def predict(self, texts, texts_b=None, batch_size: int = 64, sort_by_length: bool = True, task=None) -> list:
        """One Prediction per text, in input order.

        `texts`: a list (or any iterable) of strings.  A bare string is one text, and the answer is still a
        list (of one), as for a list, so a caller never branches on it.  `texts_b`: the second texts of pair
        tasks, alike (None at rows of one-text tasks).  Every text must be a non-empty string and
        `batch_size` a positive integer: anything else is an InputError naming the argument (and the
        item's index and type), as pt-run names the line and the server the instance.  `task` and
        `sort_by_length` as for `logits`.
        """
        rows, logits = self._run(texts, texts_b, batch_size, sort_by_length, task)
        shown = self.manifest.several
        return [prediction(r.task.labels, row, r.task.name if shown else None) for r, row in zip(rows, logits)]

    def _run(self, texts, texts_b, batch_size: int, sort_by_length: bool, task) -> tuple:
        """(each row's TaskInput, logits)."""
        self.no_labels()
        check_batch_size(batch_size)
        texts, texts_b = as_texts(texts, texts_b)
        rows = self.row_tasks(task, len(texts))
        encodings = self._encode(texts, texts_b, rows)
        width = max(len(r.task.labels) for r in rows) if rows else len(self.manifest.tasks[0].labels)
        task_ids = np.array([r.index for r in rows], np.int32) if self.manifest.multi_task else None
        out = batched_logits(self.model, encodings, self.manifest.pad_id, width, batch_size, sort_by_length, task_ids)
        for i, r in enumerate(rows):
            out[i, len(r.task.labels):] = np.nan
        return rows, out

    def encode(self, texts, texts_b=None, task=None) -> list:
        """Token encodings as the graph receives them, in input order (each row's template applied, if any).

        For rows of pair tasks `texts_b` holds the second texts (None at rows of single-text tasks); both
        are checked as `predict` checks them.
        """
        self.no_labels()
        texts, texts_b = as_texts(texts, texts_b)
        return self._encode(texts, texts_b, self.row_tasks(task, len(texts)))

    def _encode(self, texts: list, texts_b: list | None, rows: list) -> list:
        out = [None] * len(texts)
        for name, spec in self.tasks.items():
            index = [i for i, r in enumerate(rows) if r is spec]
            if not index:
                continue
            if spec.task.pair:
                seconds = [None if texts_b is None else texts_b[i] for i in index]
                if any(b is None for b in seconds):
                    raise InputError(f"task {name!r} takes sentence pairs: every one of its texts needs a second text")
            else:
                if texts_b is not None and any(texts_b[i] is not None for i in index):
                    raise InputError(f"task {name!r} takes one text per input, not a pair")
                seconds = None
            for i, e in zip(index, encode(spec.tokenizer, [texts[i] for i in index], seconds, spec.template)):
                out[i] = e
        return out


def as_texts(texts, texts_b) -> tuple:
    """(texts, texts_b) as lists of checked texts; a bare string is one text (iterating it would give its
    characters, one prediction each)."""
    if isinstance(texts, str):
        texts, texts_b = [texts], [texts_b] if isinstance(texts_b, str) else texts_b
    texts = listed(texts, "texts", "a string or a list of strings")
    for i, text in enumerate(texts):
        refuse(check_text(text, f"texts[{i}]"))
    if texts_b is None:
        return texts, None
    texts_b = listed(texts_b, "texts_b", "a list of strings (None at rows of one-text tasks)")
    if len(texts_b) != len(texts):
        raise InputError(f"{len(texts)} texts but {len(texts_b)} second texts")
    for i, text in enumerate(texts_b):
        refuse(None if text is None else check_text(text, f"texts_b[{i}]"))
    return texts, texts_b


def check_batch_size(batch_size) -> None:
    # 0 failed deep in the batching, and -1 made no batches at all: every row answered from all-zero logits.
    if not (isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")


def listed(values, name: str, what: str) -> list:
    # A string or bytes iterates as characters or byte values: never a list of texts.
    if isinstance(values, (str, bytes, bytearray, dict)) or not hasattr(values, "__iter__"):
        raise InputError(f"{name} must be {what}, not {type(values).__name__}")
    return list(values)


def refuse(problem: str | None) -> None:
    if problem:
        raise InputError(problem)


def check_width(directory: Path, manifest: Manifest, model, graph: str) -> None:
    """The graph's logits are as wide as the manifest's widest task says: a hand-edited label list would
    otherwise fail in numpy (a label too many) or renormalise silently (one too few)."""
    width = getattr(model, "logits_width", None)  # None: the backend knows it only once run (batched_logits)
    index = max(range(len(manifest.tasks)), key=lambda i: len(manifest.tasks[i].labels))
    labels = len(manifest.tasks[index].labels)
    if width is not None and width != labels:
        raise BundleError(f"{directory / MANIFEST}: field 'tasks[{index}].labels' lists {labels} labels, but"
                          f" {graph} gives {width} logits per row")


def read_template(task: Task, directory: Path, index: int):
    """A hard-prompt task's template (None for a soft prompt): inputs go into it before the graph."""
    if not task.template:
        return None
    try:
        return Template.parse(task.template, pair=task.pair)
    except TemplateError as e:
        raise BundleError(f"{directory / MANIFEST}: field 'tasks[{index}].template': {e}") from e


def open_tuned(runner, path: Path, device: str, tables: dict | None, manifest: Manifest, precision: str):
    """The graph opened as the fastest variant and token budget measured on this CPU (runtime.tuning)."""
    kind = runner.model_type(device)
    if not kind.tuned:
        return runner.open(path, device, tables, precision=precision)
    key = tuning.key_of(runner.name, kind.version, manifest.backbone.sha256, path.name, precision, manifest.multi_task)
    about = {"backend": f"{runner.name} {kind.version}", "backbone": manifest.backbone.name, "graph": path.name,
             "precision": precision}
    model, choice = tuning.tune(lambda variant: runner.open(path, device, tables, variant, precision),
                                kind.variants_for(precision), key, manifest.multi_task, about)
    model.token_budget, model.call_tokens = choice.token_budget, choice.call_tokens
    return model


def batched_logits(model, encodings, pad_id: int, num_labels: int, batch_size: int = 64,
                   sort_by_length: bool = True, task_ids: np.ndarray | None = None) -> np.ndarray:
    """Run `model` over batches (length-sorted by default); logits come back in input order.

    `task_ids` (a multi-task graph): each row's task; rows of different tasks share batches.  A batch runs as
    calls of at most the model's `token_budget` padded tokens, its rows in order of length and cut where padding
    would cost more than a call (runtime.tuning.calls), which changes its speed only.
    """
    out = np.zeros((len(encodings), num_labels), np.float32)
    lengths = np.array([len(e.ids) for e in encodings], np.int64)
    for batch in batch_indices(lengths, batch_size, sort_by_length):
        if not sort_by_length:  # consecutive rows: by length within their batch (batch_indices sorted the others)
            batch = batch[np.argsort(lengths[batch], kind="stable")]
        for part in tuning.calls(lengths[batch], model.token_budget, model.call_tokens):
            index = batch[part]
            arrays = pad([encodings[i] for i in index], pad_id, model.pad_multiple)
            if task_ids is not None:
                arrays = (*arrays, task_ids[index])
            logits = model(*arrays)
            if logits.shape[-1] < num_labels:  # a backend that does not know its graph's width before running it
                raise BundleError(f"{getattr(model, 'path', 'the graph')}: {logits.shape[-1]} logits per row, fewer"
                                  f" than the {num_labels} labels its {MANIFEST} lists")
            out[index] = logits[:, :num_labels]
    return out


def prediction(labels, logits_row, task: str | None = None) -> Prediction:
    """A Prediction from one row of logits (its first len(labels) columns are the task's)."""
    p = softmax(np.asarray(logits_row[: len(labels)], np.float64)[None])[0]
    return Prediction(labels[int(p.argmax())], {l: float(v) for l, v in zip(labels, p)}, task)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
