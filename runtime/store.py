"""The task store of `pt-run serve --task-store DIR`: its entries, how one is checked and opened, and the graphs
entries share.

An entry is a subdirectory of DIR holding a manifest.json.  Entries whose
graphs take the task tables (`pt-build merge`, of one task or several) and
are the same graph file (by the sha256 their manifests record, with the same
tokenizer, pad id and table shapes) run on one `Shared` graph: one model in
memory, one table whose rows are their tasks, one batcher, so requests for
any of them share batches.  Loading such an entry when its graph is open
checks and reads only what it brings (manifest and tables) and writes its
rows into a free part of the table; its own copies of the graph and the
tokenizer are not read (the open ones have the sha256 its manifest records).
Any other entry is opened as a bundle of its own.

A PEFT adapter directory in DIR (runtime.adapter reads it) loads onto an open
shared graph of the backbone it names (base_model_name_or_path, its sizes
checked): its prompt and head become one row of that graph's tables, as
`pt-build merge` would lay them out, so it answers as the merged bundle of it
would.  It needs a merged entry on that backbone loaded first, with room in
its tables (prompt slots or prefix keys, labels, pooling); a SEQ_CLS adapter on
BERT also needs the checkpoint's pooler, which merged bundles record.  It is
served as one task named after its entry, labels LABEL_0.. (transformers'
default), one text per input, at the graph's first max_length; for other
labels or pairs, `pt-build merge NAME=ADAPTER --backbone ...` makes an entry.
An adapter's files have no recorded sha256 to check: they are read once and
checked for shape and type.

Only the server's event loop changes a Shared (rows placed and released);
the files are checked and read on a worker thread first (`TaskStore.prepare`).
A row is released only when no request holds its entry, so a row still
queued or running is never overwritten by another task's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import adapter, backends
from .bundle import Bundle
from .errors import BundleError, InputError
from .format import (BACKBONE_POOLER, BACKBONE_PREFIX, CALIBRATION_DETAIL, MANIFEST, PEFT_CONFIG, PROMPT,
                     TABLE_PREFIX, TOKENIZER, Manifest, empty_tables, read_json_object, read_tables, read_verified,
                     resized, task_axis, union_ranges, verify_files, well_formed_ranges)


@dataclass
class Prepared:
    """A store entry checked and read, ready to serve (TaskStore.prepare)."""

    entry: str
    directory: Path
    manifest: Manifest
    key: tuple | None  # the shared graph it runs on (None: a graph of its own)
    tables: dict | None  # its task tables in memory (on a shared graph)
    bundle: Bundle | None  # opened on its own graph (or as the first on its key); None: joins an open Shared
    pooler: dict | None = None  # the checkpoint's pooler its tables record (BACKBONE_POOLER), if any


@dataclass
class Shared:
    """One graph open for every loaded entry on it: the task tables with room for `capacity` tasks, which rows no
    entry holds, the requests' batcher (runtime.serve sets it)."""

    key: tuple
    model: object
    pad_id: int
    tokenizers: dict  # max_length -> tokenizer, shared by the entries' bundles
    backbone: object  # the entries' BackboneInfo (a PEFT adapter joins the graph of the backbone it names)
    tables: dict = field(default_factory=dict)
    free: list = field(default_factory=list)  # rows no entry holds, lowest first
    batcher: object = None
    poolings: dict = field(default_factory=dict)  # pooling name -> its index in task.pooling, as entries use them
    pooler: dict | None = None  # the checkpoint's pooler, as an entry's tables record it (BACKBONE_POOLER)
    ranges: dict | None = None  # the activation ranges its int8 scales cover: union of its tasks' recorded ones
    positions: int = 0  # the most positions (prompt + text) any task on it was checked for at build

    @property
    def width(self) -> int:
        """Logits per row: the widest head the tables hold room for."""
        return self.tables["task.classifier.bias"].shape[1]

    @property
    def capacity(self) -> int:
        return self.tables["task.classifier.bias"].shape[0]

    @classmethod
    def open(cls, prepared: Prepared) -> "Shared":
        bundle = prepared.bundle
        tokenizers = {t.task.max_length: t.tokenizer for t in bundle.tasks.values()}
        shared = cls(prepared.key, bundle.model, prepared.manifest.pad_id, tokenizers, prepared.manifest.backbone)
        shared.tables = empty_tables(prepared.tables, 0)
        return shared

    @property
    def max_length(self) -> int:
        """The max_length a task without its own (a PEFT adapter) runs at: the first entry's first task's."""
        return next(iter(self.tokenizers))

    def learn(self, prepared: Prepared) -> None:
        """What an entry's tables say of the graph: which index each of its tasks' poolings has, the pooler."""
        for i, task in enumerate(prepared.manifest.tasks):
            self.poolings.setdefault(task.pooling, int(prepared.tables["task.pooling"][i]))
        self.pooler = self.pooler or prepared.pooler
        self.positions = max([self.positions] + [t.num_virtual_tokens + t.max_length for t in prepared.manifest.tasks])
        recorded = [t.details.get(CALIBRATION_DETAIL) for t in prepared.manifest.tasks]
        if self.ranges is None and all(well_formed_ranges(r) for r in recorded):
            self.ranges = union_ranges(recorded)

    def place(self, tables: dict) -> list:
        """Write an entry's task tables into free rows (growing the tables if none are left); its rows."""
        count = tables["task.classifier.bias"].shape[0]
        if len(self.free) < count:
            self.grow(max(2 * self.capacity, self.capacity - len(self.free) + count))
        rows, self.free = self.free[:count], self.free[count:]
        # Written in place, into rows no request reads (the model may be running meanwhile): every backend's
        # swap_tables shares the arrays' memory, so the model reads the new rows from its next call on.
        for name, array in self.tables.items():
            array[along(array.ndim, task_axis(name), rows)] = tables[name]
        return rows

    def release(self, rows: list) -> None:
        """An entry's rows are free (no request holds it: runtime.serve calls this when the last one is done)."""
        self.free = sorted(self.free + list(rows))

    @property
    def empty(self) -> bool:
        return len(self.free) == self.capacity

    def grow(self, capacity: int) -> None:
        """Tables with room for `capacity` tasks: new arrays, the rows copied; a call running keeps the old ones."""
        grown = {}
        for name, array in self.tables.items():
            axis = task_axis(name)
            grown[name] = np.zeros(resized(array.shape, axis, capacity), array.dtype)
            grown[name][along(array.ndim, axis, slice(0, array.shape[axis]))] = array
        self.free += list(range(self.capacity, capacity))
        self.tables = grown
        self.model.swap_tables(self.tables)


def along(ndim: int, axis: int, which) -> tuple:
    """An index picking `which` (rows or a slice) on the tables' task axis and everything on the others."""
    return (slice(None),) * axis + (which,) + (slice(None),) * (ndim - axis - 1)


class TaskStore:
    """A directory of bundles loaded and unloaded at run time (the V2 repository extension's "models")."""

    def __init__(self, directory, device: str = "CPU", backend: str | None = None, precision: str = "fp32",
                 token: str | None = None, on_demand: bool = False, max_loaded: int | None = None):
        self.directory = Path(directory).resolve()
        if not self.directory.is_dir():
            raise InputError(f"--task-store {directory}: no such directory")
        self.device, self.backend, self.precision = device, backend, precision  # as pt-run serve opens bundles
        self.graph = backends.get(backend, device, precision).graph_file(precision)
        self.token = token
        # on_demand: an entry loads when a request names it (none at start); max_loaded: at most this many entries
        # loaded at once, the least recently used unloaded to make room (its requests in flight are answered)
        self.on_demand, self.max_loaded = on_demand, max_loaded
        self.shared = {}  # key -> Shared, while an entry on it is loaded (runtime.serve keeps it)

    def entries(self) -> list:
        """The store's bundles (its subdirectories holding a manifest.json) and PEFT adapters (an
        adapter_config.json), except links leading out of it."""
        return sorted(p.name for p in self.directory.iterdir() if self.inside(p) and self.holds_one(p))

    def is_adapter(self, entry: str) -> bool:
        return adapter.is_adapter(self.directory / entry)

    @staticmethod
    def holds_one(path: Path) -> bool:
        return (path / MANIFEST).is_file() or (path / PEFT_CONFIG).is_file()

    def inside(self, path: Path) -> bool:
        resolved = path.resolve()
        return resolved != self.directory and resolved.is_relative_to(self.directory)

    def stays_inside(self, entry: str, names) -> None:
        """The server reads only the store: a file of the entry that is a link leading out of it is refused."""
        for name in names:
            path = self.directory / entry / name
            if (path.is_symlink() or path.exists()) and not self.inside(path):  # a link anywhere on its path
                raise BundleError(f"{entry}/{name} leads out of the task store")

    def prepare(self, entry: str, open_keys) -> Prepared:
        """Check the files of an entry the server reads against the manifest's sha256, each once, and read them
        (on a worker thread: hashing takes a while).  On a graph in `open_keys`, its tables (and its tokenizer if it
        reads it: reads_tokenizer); else those, the tokenizer and the graph, then the bundle opened on it (a bundle's
        other graphs are not read, as Bundle.load)."""
        directory = self.directory / entry
        if adapter.is_adapter(directory):
            self.stays_inside(entry, adapter.FILES)
            return self.prepare_adapter(entry, directory, open_keys)
        self.stays_inside(entry, [MANIFEST])
        manifest = Manifest.read(directory)
        self.stays_inside(entry, manifest.files)
        key, tables, pooler = None, None, None
        if manifest.multi_task and self.graph in manifest.files and PROMPT in manifest.files:
            # read once and checked, held in memory (Shared.place copies the rows out of it)
            read = read_tables(directory / PROMPT, read_verified(directory, manifest, PROMPT),
                               (TABLE_PREFIX, BACKBONE_PREFIX))
            pooler = {n: read.pop(n) for n in BACKBONE_POOLER if n in read} or None
            if read:  # a merged bundle written before the tables were inputs has none: it runs on its own
                shapes = tuple(sorted((n, a.dtype.str, resized(a.shape, task_axis(n), 0)) for n, a in read.items()))
                key = (manifest.files[self.graph], manifest.files.get(TOKENIZER), manifest.pad_id, shapes)
                tables = read
        if key is not None and key in open_keys:
            # It runs on the open graph and that graph's tokenizers, whose sha256 (the same as its manifest records)
            # was checked when the graph opened; its own copies are not read, so not checked either, unless it needs
            # a tokenizer of a max_length the graph has none of yet (then read from its file: join).
            if self.reads_tokenizer(key, manifest):
                verify_files(directory, manifest, [TOKENIZER])
            return Prepared(entry, directory, manifest, key, tables, None, pooler)
        # the tables were checked above; a graph the bundle lacks is Bundle.load's to name
        verify_files(directory, manifest, [n for n in (TOKENIZER, self.graph) if n in manifest.files])
        bundle = Bundle.load(directory, self.device, self.backend, precision=self.precision, verify=False)
        if key is not None and not hasattr(bundle.model, "swap_tables"):
            key = None  # a backend that cannot be fed a shared table: the entry runs on its own graph
        return Prepared(entry, directory, manifest, key, tables, bundle, pooler)

    def prepare_adapter(self, entry: str, directory: Path, open_keys) -> Prepared:
        """A PEFT adapter read onto an open graph of the backbone it names: its rows of that graph's tables."""
        config = read_json_object(directory / PEFT_CONFIG, BundleError)
        open_graphs = [s for k, s in list(self.shared.items()) if k in open_keys]
        graphs = [s for s in open_graphs if adapter.trained_on(config, s.backbone)]
        if not graphs:
            names = sorted({s.backbone.name for s in open_graphs})
            raise BundleError(f"{directory / PEFT_CONFIG}: base_model_name_or_path"
                              f" {config.get('base_model_name_or_path')!r}: no loaded entry runs a merged graph of"
                              f" that backbone (loaded: {', '.join(names) or 'none'}); load one first, or fold the"
                              f" adapter into an entry with `pt-build merge {entry}={directory} --backbone BACKBONE"
                              f" --out {self.directory}/NAME`")
        problem = None
        for shared in graphs:  # the first graph with room for it
            try:
                read = adapter.read(directory, shared.backbone, BundleError)
                rows = adapter.table_rows(read, shared.tables, shared.poolings, shared.pooler, directory, BundleError)
                if read.virtual_tokens + shared.max_length > shared.positions:
                    raise BundleError(f"{directory}: its {read.virtual_tokens} virtual tokens before"
                                      f" {shared.max_length} text tokens need more positions than any task on the"
                                      f" graph was checked for ({shared.positions}); fold it with pt-build merge")
                if self.precision == "int8":
                    adapter.check_int8(directory, shared.ranges, BundleError)
            except BundleError as e:
                problem = problem or e
                continue
            task = adapter.task(read, directory, entry, shared.max_length)
            manifest = Manifest(tasks=(task,), pad_id=shared.pad_id, backbone=shared.backbone, device=self.device,
                                task_tables=True)
            return Prepared(entry, directory, manifest, shared.key, rows, None)
        raise problem

    def reads_tokenizer(self, key: tuple, manifest: Manifest) -> bool:
        """Whether an entry joining the graph of `key` needs its own tokenizer file (a max_length it has none of)."""
        shared = self.shared.get(key)
        return shared is None or any(t.max_length not in shared.tokenizers for t in manifest.tasks)

    def join(self, prepared: Prepared) -> tuple:
        """(the entry's Bundle, its Shared or None, its tasks' rows in the graph's tables): on the event loop."""
        if prepared.key is None:
            return prepared.bundle, None, [t.index for t in prepared.bundle.tasks.values()]
        shared = self.shared.get(prepared.key)
        if shared is None:
            shared = self.shared[prepared.key] = Shared.open(prepared)
        elif prepared.bundle is None and self.reads_tokenizer(prepared.key, prepared.manifest):
            verify_files(prepared.directory, prepared.manifest, [TOKENIZER])  # the graph reopened since prepare
        shared.learn(prepared)
        rows = shared.place(prepared.tables)
        bundle = Bundle(prepared.directory, prepared.manifest, shared.model, prepared.directory / TOKENIZER,
                        tokenizers=shared.tokenizers)
        return bundle, shared, rows

    def quiet(self, message: str) -> str:
        """A message naming files by their place in the store, not the server's paths."""
        return message.replace(f"{self.directory}/", "")
