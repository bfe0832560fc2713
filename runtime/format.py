"""The bundle format, in one place: file names, graph signature, manifest, version.

A bundle is a directory:

    manifest.json        this module's `Manifest`: what the bundle is, how it was made, sha256 of every file
    model.mindir         the folded graph for MindSpore (Ascend, GPU, CPU)
    model.onnx           the same graph for onnxruntime
    model.int8.onnx      optional: int8 copy of model.onnx
    tokenizer.json       read with the `tokenizers` library
    prompt.safetensors   the learned prompt (`prompt_embeddings`, PEFT's key) and the head; in a merged bundle,
                         the task tables (below)
    training_log.json    the training curve
    peft/                optional: the prompt and head as a PEFT adapter directory (adapter_config.json,
                         adapter_model.safetensors; a mean-pooling one's head beside it in head.safetensors)
                         that `PeftModel.from_pretrained` loads, when PEFT can express the task exactly; the
                         task's details["peft"] says which (`PEFT_DETAIL`)

A generation bundle (pt-build's decoders: a Llama-family causal LM and its
learned prompt, run token by token by runtime.generate) is a directory too:

    manifest.json             one task of kind "generate" (`GENERATE`), no labels; its details["generation"]
                              (`GENERATION_DETAIL`) holds the eos ids, the context length and the cache shape
    decoder.onnx              the decoder with a KV cache (`decoder_signature`, below)
    decoder.int8.onnx         optional: its int8 copy (com.microsoft.MatMulNBits: 8-bit weights and activations per
                              block of 32, the LM head included; builder.bundles.generation.quantize_decoder)
    decoder.mindir            optional (bundles since MindSpore generation): the decoder for MindSpore over a
                              static KV cache of details["generation"]["mindir_capacity"] slots (`MINDIR_CAPACITY`;
                              signature below)
    prompt_cache.safetensors  the learned prompt's keys and values at every layer, "key.{i}" and "value.{i}"
                              float32 [kv_heads, P, head_dim] (P = num_virtual_tokens; zero-length for no
                              prompt): every generation's cache starts as these
    tokenizer.json            read with the `tokenizers` library

The decoder graph's signature (`decoder_signature`): int64 `input_ids` and
`position_ids` [batch, seq] (the text's positions start at P), int64
`attention_mask` [batch, past + seq] (1 = attend, the cache's positions
included), float32 `past_key.{i}` / `past_value.{i}` [batch, kv_heads, past,
head_dim] per layer i in; float32 `logits` [batch, vocab] at each row's last
attended new position, and `present_key.{i}` / `present_value.{i}` [batch,
kv_heads, past + seq, head_dim] (the past with the new tokens appended) out.
decoder.mindir (builder.graphs.mindir_decoder) keeps each cache at a fixed capacity
C, so MindSpore's GraphCell, which prepares a graph per input shape, sees
one shape for every decode step.  Its inputs, in this order (GraphCell's are
positional): int32 `input_ids` and `position_ids` [batch, seq], int32
`cache_position` [seq] (the cache slot each new token is written to), int32
`attention_mask` [batch, C] (1 = the slot holds a key to attend to, after
this call's writes), then float32 `key_cache.{i}`, `value_cache.{i}` [batch,
kv_heads, C, head_dim] for each layer i; out: `logits` [batch, vocab] as
above, then the caches in the same order with the new tokens written.  A
slot is an index of decoder.onnx's cache (the prompt cache in slots 0..P-1),
so the two graphs read the same sequence of calls alike.
Generation bundles keep FORMAT_VERSION 3: their manifest is a version-3
manifest, and a runtime from before them refuses one already (its Task check
rejects kind "generate" and an empty label list, naming the field), while
bumping the version would make older runtimes refuse new classifier bundles
too, for nothing.

The manifest's `files` names every file by its path relative to the bundle,
"/"-separated ("model.onnx", "peft/adapter_config.json"); bundles written
before the peft/ directory list flat names only, and verify the same way.

Every graph has the signature `signature(...)`: int32 `input_ids`,
`attention_mask`, `token_type_ids` of shape [batch, seq] in, float32 `logits`
[batch, num_labels] out.  A multi-task bundle (pt-build merge) holds several
tasks on one backbone in one graph: its graph also takes int32 `task_ids`
[batch], each row's task as an index into the manifest's `tasks`, and its
`logits` are as wide as the task with most labels (a row's own labels come
first; the rest is padding).  Every task's prompt and head are rows of the
task tables, float32 arrays named "task.*" (`TABLE_PREFIX`; the builder's
builder.models.classifier.task_tables explains each), one row per task on
axis 0, or axis 1 for a prefix's keys and values "task.past.{i}" [2, tasks,
heads, Q, head_dim] (`task_axis`).  They are stored once, in
prompt.safetensors, and are inputs of every graph of the bundle, named as
stored (MindIR's inputs are positional: `table_names` gives their order,
after task_ids): the runtime feeds them on every call, so a bundle of 1,000
tasks stores them once and not in each graph.  Beside them, not graph inputs: the
checkpoint's pooler where it has one (`BACKBONE_POOLER`).  (Merged bundles written
before the tables were inputs hold them inside their graphs, and their
prompt.safetensors holds each task's own arrays as "<task>/<name>"; they
load as before.)  The builder writes a `Manifest` with
`Manifest.write`; the runtime reads it with `Manifest.read`, which checks
every field and names the file and field of anything wrong.  Nothing else
reads or writes manifest.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BundleError

FORMAT_VERSION = 3  # generation bundles did not bump it: see the module docstring
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
PROMPT = "prompt.safetensors"
TRAINING_LOG = "training_log.json"
GRAPHS = {"mindir": "model.mindir", "onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}  # graph kind -> file
# The bundle's prompt and head as PEFT writes an adapter (builder.bundles.peft); task.details[PEFT_DETAIL] is PEFT_DIR
# when the bundle holds it, else "not expressible: <why>" (e.g. mean pooling: PEFT's classifier heads read one token).
PEFT_DIR = "peft"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# A FEATURE_EXTRACTION adapter (a prefix over the bare encoder: PEFT has no mean-pooling head) carries its
# head beside it: the Linear over the mean of the text rows, tensors "weight" [labels, hidden] and "bias".
PEFT_HEAD = "head.safetensors"
PEFT_DETAIL = "peft"
# The activation ranges an int8 graph's fixed scales were made from, {quantized GEMM node(s): [min, max]} over the
# task's calibration texts: task.details[CALIBRATION_DETAIL], and beside a bundle's PEFT adapter as
# PEFT_CALIBRATION, so that pt-build merge can make a merged int8 graph without the training data.
CALIBRATION_DETAIL = "int8_ranges"
PEFT_CALIBRATION = "ptbundle_calibration.json"
PEFT_NOT_EXPRESSIBLE = "not expressible: "

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
TASK_INPUT = "task_ids"  # multi-task graphs only: int32 [batch], each row's index into Manifest.tasks
TABLE_PREFIX = "task."  # a merged bundle's task tables: graph inputs stored once in prompt.safetensors
# Beside them in a merged bundle's prompt.safetensors, not graph inputs: the checkpoint's own pooler ([out, in] and
# [out], as the checkpoint holds it) where the backbone has one (BERT), which a SEQ_CLS PEFT adapter's head reads
# and does not carry, so that a task store can serve such an adapter on the bundle's graph (runtime.adapter).
BACKBONE_PREFIX = "backbone."
BACKBONE_POOLER = ("backbone.pooler.weight", "backbone.pooler.bias")
OUTPUT_NAME = "logits"


def signature(multi_task: bool = False) -> dict:
    """name -> (dtype, axes) of the graph's inputs and outputs; axes are symbolic, any batch and sequence length."""
    inputs = {name: ("int32", ("batch", "seq")) for name in INPUT_NAMES}
    if multi_task:
        inputs[TASK_INPUT] = ("int32", ("batch",))
    return {"inputs": inputs, "outputs": {OUTPUT_NAME: ("float32", ("batch", "num_labels"))}}


def table_names(names) -> list:
    """The task tables among `names`, in the order a positional graph (MindIR) takes them after task_ids."""
    return sorted(n for n in names if n.startswith(TABLE_PREFIX))


def task_axis(name: str) -> int:
    """The axis of a task table that runs over tasks: 1 for a prefix's stacked keys and values, else 0."""
    return 1 if name.startswith(TABLE_PREFIX + "past.") else 0


SAFETENSORS_DTYPES = {"F32": np.float32, "I32": np.int32}  # what task tables hold


def read_tables(path: Path, data: bytes | None = None, prefix: str | tuple = TABLE_PREFIX) -> dict:
    """The task tables in a merged bundle's prompt.safetensors (none in one written before they were inputs), or
    the tensors named with other prefixes (`prefix`: one or a tuple; BACKBONE_PREFIX), as
    views of the file mapped read-only rather than read into memory: a row's pages load when a request first uses
    it, and processes serving one bundle share them.  (safetensors' own reader copies every tensor.)  `data`: the
    file's bytes, already read and checked (read_verified), viewed instead."""
    try:
        # One buffer for the file, each table a view of it: a map per table took about a quarter of a task store
        # entry's load (docs/measured.md, "Loading on demand").
        whole = np.memmap(path, np.uint8, "r") if data is None else np.frombuffer(data, np.uint8)
        size = int.from_bytes(whole[:8].tobytes(), "little")
        header = json.loads(whole[8:8 + size].tobytes())
        start = 8 + size
        tables = {}
        for name, entry in header.items():
            if not name.startswith(prefix):
                continue
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: dtype {entry['dtype']}, not one of {', '.join(SAFETENSORS_DTYPES)}")
            begin, end = entry["data_offsets"]
            dtype, shape = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]), tuple(entry["shape"])
            if end - begin != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"{name}: {end - begin} bytes for shape {list(shape)}")
            tables[name] = (whole[start + begin:start + end].view(dtype).reshape(shape) if end > begin
                            else np.zeros(shape, dtype))
        return tables
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged or foreign file
        raise BundleError(f"{path}: cannot read the task tables ({str(e).splitlines()[0][:200]})") from e


def resized(shape: tuple, axis: int, size: int) -> tuple:
    """`shape` with `size` on `axis` (a table's task axis: task_axis)."""
    return shape[:axis] + (size,) + shape[axis + 1:]


def empty_tables(tables: dict, count: int) -> dict:
    """Zeroed task tables shaped as `tables` but with room for `count` tasks."""
    return {n: np.zeros(resized(a.shape, task_axis(n), count), a.dtype) for n, a in tables.items()}


def task_rows(tables: dict, index: int) -> dict:
    """One task's rows of every table, by table name (a merge re-reads a merged bundle's tasks this way)."""
    return {name: np.take(array, index, axis=task_axis(name)) for name, array in tables.items()}


def union_ranges(ranges: list) -> dict:
    """Each role's range covering all of `ranges` (CALIBRATION_DETAIL, one per task of a merge): what a merged int8
    graph's scales are made from; every task's activations keep within them, at the cost of coarser steps for the
    tasks with the smaller ranges."""
    out = {}
    for one in ranges:
        for role, (lo, hi) in one.items():
            was = out.get(role, (lo, hi))
            out[role] = [min(was[0], lo), max(was[1], hi)]
    return out


def well_formed_ranges(ranges) -> bool:
    """CALIBRATION_DETAIL's shape: {role: [min, max]} with min <= max."""
    return isinstance(ranges, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                    for x in v) and v[0] <= v[1] for v in ranges.values())


def lay_out_row(tables: dict, t: int, role: str, p: int, layer: int, q: int, s: int) -> None:
    """What row t of the task tables sees and where its text starts, which follow from its prompt alone: role
    ("embedded", "entered", "past", or "" for none; builder.models.prompts' table_role), P vectors from `layer`,
    in tables of Q prefix keys and S slots (builder.models.classifier.task_tables explains each table)."""
    if role in ("embedded", "entered"):
        tables["task.visible"][t, 0 if role == "embedded" else layer :, q + s - p :] = 1
        tables["task.first"][t] = s - p
        tables["task.text_start"][t] = (p if role == "embedded" else 0) - s
        if role == "entered":
            tables["task.enters"][t, layer] = 1
    else:
        tables["task.first"][t] = s
        tables["task.text_start"][t] = (p if role == "past" else 0) - s
    if role == "past":
        tables["task.visible"][t, layer:, q - p : q] = 1


def write_task(tables: dict, t: int, role: str, p: int, layer: int, values: dict) -> None:
    """Row t of the task tables for one task: what it sees and where its text starts (lay_out_row), then its
    folded prompt and head, `values` named as a one-task bundle's prompt.safetensors names them
    (prompt_embeddings; classifier.weight [labels, hidden] and classifier.bias; the pooling's own, a weight
    [out, in]), the prompt right-aligned against the text and the head's labels first.  The tables' sizes come
    from the tables themselves.  pt-build merge (builder.models.classifier.task_tables) and a task store's PEFT
    adapters (runtime.adapter) both write their rows so; the shapes are the caller's to have checked."""
    s = tables["task.slot_embeds"].shape[1] if "task.slot_embeds" in tables else 0
    past = sorted(n for n in tables if n.startswith(TABLE_PREFIX + "past."))
    _, _, heads, q, head_dim = tables[past[0]].shape if past else (0, 0, 0, 0, 0)
    lay_out_row(tables, t, role, p, layer, q, s)
    values = dict(values)
    prompt = values.pop("prompt_embeddings", None)
    if role in ("embedded", "entered") and p:
        tables["task.slot_embeds" if role == "embedded" else "task.late"][t, s - p :] = prompt
    if role == "past":
        for i in range(layer, tables["task.enters"].shape[1]):
            tables[f"task.past.{i}"][:, t, :, q - p :] = prefix_keys(prompt, i - layer, heads, heads * head_dim)
    weight = np.asarray(values.pop("classifier.weight"), np.float32)
    tables["task.classifier.weight"][t, :, : weight.shape[0]] = weight.T
    tables["task.classifier.bias"][t, : weight.shape[0]] = values.pop("classifier.bias")
    for name, value in values.items():  # the pooling's own: a [out, in] weight stored transposed
        value = np.asarray(value, np.float32)
        tables[TABLE_PREFIX + name][t] = value.T if value.ndim == 2 else value


def prefix_keys(table: np.ndarray, j: int, heads: int, hidden: int) -> np.ndarray:
    """The keys and values a prefix's folded table [P, layers x 2 x hidden] puts in front of its j-th layer (from
    its first), as onnxruntime's Attention takes its `past`: [2, heads, P, head_dim]; PEFT's layout."""
    p = table.shape[0]
    return table[:, 2 * j * hidden : (2 * j + 2) * hidden].reshape(p, 2, heads, hidden // heads).transpose(1, 2, 0, 3)


# --- generation bundles (a causal decoder with a KV cache; runtime.generate) ---
DECODER_GRAPHS = {"onnx": "decoder.onnx", "onnx-int8": "decoder.int8.onnx", "mindir": "decoder.mindir"}  # kind -> file
PROMPT_CACHE = "prompt_cache.safetensors"  # "key.{i}", "value.{i}": float32 [kv_heads, P, head_dim] per layer
GENERATE = "generate"  # Task.kind of a generation bundle
DECODER_INPUTS = ("input_ids", "position_ids", "attention_mask")
DECODER_OUTPUT = "logits"


def past_names(layer: int) -> tuple:
    """The decoder graph's cache inputs of one layer: (keys, values)."""
    return f"past_key.{layer}", f"past_value.{layer}"


def present_names(layer: int) -> tuple:
    """The decoder graph's cache outputs of one layer: the past with the new tokens' keys and values appended."""
    return f"present_key.{layer}", f"present_value.{layer}"


def prompt_cache_names(layer: int) -> tuple:
    return f"key.{layer}", f"value.{layer}"


def decoder_signature(layers: int) -> dict:
    """name -> (dtype, axes) of the decoder graph's inputs and outputs (module docstring)."""
    inputs = {"input_ids": ("int64", ("batch", "seq")), "position_ids": ("int64", ("batch", "seq")),
              "attention_mask": ("int64", ("batch", "past + seq"))}
    outputs = {DECODER_OUTPUT: ("float32", ("batch", "vocab"))}
    for i in range(layers):
        for name in past_names(i):
            inputs[name] = ("float32", ("batch", "kv_heads", "past", "head_dim"))
        for name in present_names(i):
            outputs[name] = ("float32", ("batch", "kv_heads", "past + seq", "head_dim"))
    return {"inputs": inputs, "outputs": outputs}


GENERATION_DETAIL = "generation"  # Task.details key of a generation bundle: GENERATION_FIELDS
GENERATION_FIELDS = ("eos_token_ids", "max_positions", "num_layers", "num_kv_heads", "head_dim", "vocab_size")
MINDIR_CAPACITY = "mindir_capacity"  # details[GENERATION_DETAIL] key when the bundle has decoder.mindir: its cache slots
KINDS = ("soft", "hard", GENERATE)
# Task.head: the heads pt-build writes (a soft prompt's linear head, or a decoder's label words; the hard
# prompts' zero-shot and probe; a generation bundle's LM head).  The runtime reads each graph alike, so an
# unknown one is a hand edit or another tool's bundle, not a head to guess at.
HEADS = ("linear", "label-words", "zero-shot", "probe", "lm")
# Task.max_length's bound: pt-build's own (builder.recipe's --max-length); a generation task's is its context.
MAX_LENGTH = 8192

DEVICES = ("CPU", "GPU", "Ascend")
REBUILD = "rebuild it with this version's pt-build export (or pt-build import for a PEFT adapter)"


def read_json_object(path: Path, error: type) -> dict:
    """A JSON file holding one object (manifest.json, config.json); anything else is `error` naming the file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise error(f"{path}: not a JSON object")
    return raw


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_files(directory: Path) -> list:
    """Every file under `directory`, as the manifest names it: its path relative to the directory, "/"-separated,
    sorted (manifest.json itself included if it is there)."""
    directory = Path(directory)
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def parse_bundle_spec(spec: str) -> tuple:
    """'NAME=PATH' or 'PATH' (as pt-run serve and pt-build merge take bundles) -> (name or None, path)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        if name.strip():
            return name, path
    return None, spec


def is_bundle_path(name) -> bool:
    """A file name the manifest may list: relative, "/"-separated, inside the bundle (no "..", no empty parts)."""
    return (isinstance(name, str) and name != "" and not name.startswith("/") and "\\" not in name
            and all(part not in ("", ".", "..") for part in name.split("/")))


@dataclass(frozen=True)
class BackboneInfo:
    """The frozen backbone the graph contains, and its shape (so no consumer guesses it)."""

    name: str
    model_type: str
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    vocab_size: int
    sha256: str  # of the checkpoint's model.safetensors: bundles on the same backbone share it


@dataclass(frozen=True)
class Task:
    """One task a bundle predicts: its labels, how its inputs are tokenized, how it was made and scored."""

    name: str  # "mr", or the name given to pt-build merge
    kind: str  # "soft" (learned prompt), "hard" (text template) or "generate" (a decoder: GENERATE)
    labels: tuple
    pair: bool  # two texts per input
    max_length: int  # text tokens per input, special tokens included, before any prompt
    pooling: str  # registry name: "mean", "cls"
    head: str  # one of HEADS
    prompt_method: str  # registry name: "prompt-tuning" (shallow soft prompt) or "none"
    num_virtual_tokens: int
    template: str | None = None  # hard prompts: applied in token space before the graph
    recipe: dict = field(default_factory=dict)  # the training choices, as given
    details: dict = field(default_factory=dict)  # per kind, e.g. the zero-shot verbalizer; PEFT_DETAIL (see above)
    metrics: dict = field(default_factory=dict)  # dev/test (and int8) accuracy, F1, timing

    @property
    def kind_label(self) -> str:
        """'soft', or 'hard zero-shot' / 'hard probe': how tables name a bundle."""
        return f"hard {self.head}" if self.kind == "hard" else self.kind

    @property
    def generation(self) -> dict:
        """A generation task's GENERATION_FIELDS (details[GENERATION_DETAIL]); {} for a classifier."""
        return self.details.get(GENERATION_DETAIL, {}) if self.kind == GENERATE else {}

    def replace(self, **changes) -> "Task":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_json(cls, raw, path, where: str) -> "Task":
        if not isinstance(raw, dict):
            raise BundleError(f"{path}: field {where!r} must be a JSON object")
        task = cls(**fields_of(cls, raw, path, where + "."))
        task.check(path, where + ".")
        return task.replace(labels=tuple(task.labels))

    def check(self, path, where: str = "") -> None:
        need = checker(path, where)
        need(isinstance(self.name, str) and self.name.strip() == self.name and self.name != "", "name",
             f"must be a non-empty name without surrounding spaces, not {self.name!r}")
        need(self.kind in KINDS, "kind", f"is {self.kind!r}, not one of {', '.join(map(repr, KINDS))}")
        fewest = 0 if self.kind == GENERATE else 2  # a decoder writes text: it has no labels
        need(isinstance(self.labels, (list, tuple)) and len(self.labels) >= fewest
             and all(isinstance(l, str) for l in self.labels), "labels", "must list at least two label strings")
        need(len(set(self.labels)) == len(self.labels), "labels", "has duplicates")
        value = self.num_virtual_tokens
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, "num_virtual_tokens",
             f"must be a non-negative integer, not {value!r}")
        need(self.head in HEADS, "head", f"is {self.head!r}, not one of {', '.join(map(repr, HEADS))}")
        need(isinstance(self.pair, bool), "pair", "must be true or false")
        need(self.template is None or isinstance(self.template, str), "template", "must be a string or null")
        for name in ("recipe", "details", "metrics"):
            need(isinstance(getattr(self, name), dict), name, "must be a JSON object")
        if self.kind == GENERATE:
            self.check_generation(need)
        longest = self.generation["max_positions"] if self.kind == GENERATE else MAX_LENGTH
        value = self.max_length
        need(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= longest, "max_length",
             f"must be an integer from 1 to {longest} (text tokens per input), not {value!r}")

    def check_generation(self, need) -> None:
        where = f"details.{GENERATION_DETAIL}"
        gen = self.details.get(GENERATION_DETAIL)
        need(isinstance(gen, dict), where, "must be a JSON object (a generation task's eos ids and cache shape)")
        for name in GENERATION_FIELDS:
            need(name in gen, where, f"misses {name!r}")
        eos = gen["eos_token_ids"]
        need(isinstance(eos, list) and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos),
             f"{where}.eos_token_ids", f"must list token ids, not {eos!r}")
        for name in GENERATION_FIELDS[1:]:
            value = gen[name]
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"{where}.{name}",
                 f"must be a positive integer, not {value!r}")
        need(self.num_virtual_tokens < gen["max_positions"], "num_virtual_tokens",
             f"is {self.num_virtual_tokens}, leaving no room in the context of {gen['max_positions']} positions")
        if MINDIR_CAPACITY in gen:
            capacity = gen[MINDIR_CAPACITY]
            need(isinstance(capacity, int) and not isinstance(capacity, bool)
                 and self.num_virtual_tokens < capacity <= gen["max_positions"], f"{where}.{MINDIR_CAPACITY}",
                 f"must be an integer above num_virtual_tokens and at most max_positions, not {capacity!r}")


@dataclass(frozen=True)
class Manifest:
    """Everything a consumer needs to know about a bundle, validated on read."""

    tasks: tuple  # of Task; one for a bundle that pt-build export wrote, several for a merged one
    pad_id: int
    backbone: BackboneInfo
    device: str  # the device it was trained on
    export: dict = field(default_factory=dict)  # parity of each graph with the trained model
    files: dict = field(default_factory=dict)  # path relative to the bundle ("peft/adapter_config.json") -> sha256
    created: str = ""
    versions: dict = field(default_factory=dict)  # libraries that built it
    format_version: int = FORMAT_VERSION
    # The graphs take task_ids and the task tables (pt-build merge writes it, of one task too: a task store
    # shares one graph among such bundles).  Absent in a merged bundle written before; it has several tasks.
    task_tables: bool = False

    @property
    def multi_task(self) -> bool:
        """The graph takes `task_ids` (TASK_INPUT): a merged bundle, of one task or several."""
        return self.task_tables or len(self.tasks) > 1

    @property
    def several(self) -> bool:
        """More than one task: each is named where it is used or shown."""
        return len(self.tasks) > 1

    @property
    def generative(self) -> bool:
        """A generation bundle: a decoder graph and a prompt cache (module docstring), not a classifier."""
        return any(t.kind == GENERATE for t in self.tasks)

    @property
    def only(self) -> Task:
        """The task of a single-task bundle."""
        if self.several:
            raise BundleError(f"this bundle holds {len(self.tasks)} tasks ({', '.join(self.task_names)}): name one")
        return self.tasks[0]

    @property
    def task_names(self) -> list:
        return [t.name for t in self.tasks]

    @property
    def kind_label(self) -> str:
        return self.tasks[0].kind_label if not self.several else "multi-task"

    def task(self, name: str | None = None) -> Task:
        """The task called `name`; None names the only task of a single-task bundle."""
        if name is None:
            return self.only
        for t in self.tasks:
            if t.name == name:
                return t
        raise BundleError(f"no task {name!r} in this bundle (it has {', '.join(self.task_names)})")

    def replace(self, **changes) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def replace_task(self, name: str, **changes) -> "Manifest":
        return self.replace(tasks=tuple(t.replace(**changes) if t.name == name else t for t in self.tasks))

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["tasks"] = [t.to_json() for t in self.tasks]
        graph = (decoder_signature(self.tasks[0].generation["num_layers"]) if self.generative
                 else signature(self.multi_task))
        out["signature"] = {part: {n: {"dtype": d, "axes": list(a)} for n, (d, a) in io.items()}
                            for part, io in graph.items()}
        return {"format": "ptbundle", **out}

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise BundleError(f"{directory}: not a bundle (no {MANIFEST})")
        return cls.from_json(read_json_object(path, BundleError), path)

    @classmethod
    def from_json(cls, raw: dict, path: Path | str = MANIFEST) -> "Manifest":
        version = raw.get("format_version")
        if version == 1:
            raw = upgrade_v2(upgrade_v1(raw))
        elif version == 2:
            raw = upgrade_v2(raw)
        elif version != FORMAT_VERSION:
            raise BundleError(f"{path}: format_version {version!r}; this runtime reads versions 1 to"
                              f" {FORMAT_VERSION}: {REBUILD}")
        values = fields_of(cls, raw, path)
        try:
            values["backbone"] = BackboneInfo(**values["backbone"])
        except TypeError as e:
            raise BundleError(f"{path}: field 'backbone': {e}") from e
        tasks = values["tasks"]
        if not isinstance(tasks, list) or not tasks:
            raise BundleError(f"{path}: field 'tasks' must list at least one task")
        values["tasks"] = tuple(Task.from_json(t, path, f"tasks[{i}]") for i, t in enumerate(tasks))
        manifest = cls(**values)
        manifest.check(path)
        return manifest

    def check(self, path) -> None:
        """Types and values of the fields; the message names the field."""
        need = checker(path)
        names = self.task_names
        need(len(set(names)) == len(names), "tasks", f"names a task twice ({', '.join(names)})")
        need(not self.generative or len(self.tasks) == 1, "tasks", "holds a generation task among others"
             " (a generation bundle has one task)")
        need(isinstance(self.pad_id, int) and not isinstance(self.pad_id, bool) and self.pad_id >= 0, "pad_id",
             f"must be a non-negative integer, not {self.pad_id!r}")
        need(self.device in DEVICES, "device", f"is {self.device!r}, not one of {', '.join(DEVICES)}")
        need(isinstance(self.files, dict) and all(isinstance(v, str) for v in self.files.values()), "files",
             "must map file names to sha256 strings")
        bad = [name for name in self.files if not is_bundle_path(name)]
        need(not bad, "files", f"names {bad[0]!r}, not a relative path inside the bundle" if bad else "")
        for name in ("export", "versions"):
            need(isinstance(getattr(self, name), dict), name, "must be a JSON object")
        need(isinstance(self.task_tables, bool), "task_tables", f"must be true or false, not {self.task_tables!r}")


def fields_of(cls, raw: dict, path, where: str = "") -> dict:
    """The dataclass fields of `cls` found in `raw`; a missing required one is an error naming it."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BundleError(f"{path}: missing field {where + f.name!r}")
            continue
        values[f.name] = raw[f.name]
    return values


def checker(path, where: str = ""):
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise BundleError(f"{path}: field {where + name!r} {what}")
    return need


BUNDLE_FIELDS = ("pad_id", "backbone", "device", "export", "files", "created", "versions")


def upgrade_v2(raw: dict) -> dict:
    """Version-2 bundles describe one task at the top level: read them as a version-3 bundle of one task."""
    task = {k: v for k, v in raw.items() if k not in BUNDLE_FIELDS + ("format", "format_version", "signature")}
    if "task" in task:
        task["name"] = task.pop("task")
    return {**{k: raw[k] for k in BUNDLE_FIELDS if k in raw}, "tasks": [task], "format_version": FORMAT_VERSION}


def upgrade_v1(raw: dict) -> dict:
    """Round-1 bundles (format_version 1) differ only in naming: read them as version 2 (then upgrade_v2)."""
    bb = raw.get("backbone") or {}
    hidden = bb.get("hidden_size", 0)
    out = {k: v for k, v in raw.items() if k not in ("format", "inputs", "outputs", "verbalizer",
                                                     "calibration_texts", "seed")}
    out["backbone"] = {"name": bb.get("name", "?"), "model_type": bb.get("model_type", "?"), "hidden_size": hidden,
                       "layers": bb.get("layers", 0), "heads": 0, "intermediate_size": 0, "vocab_size": 0,
                       "sha256": bb.get("sha256", "")}
    out["head"] = raw.get("head") or "linear"
    out["prompt_method"] = "prompt-tuning" if raw.get("num_virtual_tokens") else "none"
    out["num_virtual_tokens"] = raw.get("num_virtual_tokens", 0)
    out["details"] = {k: raw[k] for k in ("verbalizer", "calibration_texts") if k in raw}
    out["device"] = raw.get("device", "CPU")
    out["format_version"] = 2
    return out


def verify_files(directory: Path, manifest: Manifest, names=None) -> None:
    """The files (default: every file the manifest lists, nested ones by their relative path) exist and have the
    recorded sha256."""
    for name in names or manifest.files:
        if name not in manifest.files:
            raise BundleError(f"{directory}: this bundle has no {name}")
        problem = file_problem(directory, name, manifest.files[name])
        if problem:
            raise BundleError(problem)


def file_problem(directory: Path, name: str, expected: str) -> str | None:
    """What is wrong with one file the manifest lists (missing, or another sha256), as one line; None if nothing."""
    path = Path(directory) / name
    if not path.is_file():
        return f"{path}: missing (listed in {MANIFEST})"
    return hash_problem(path, sha256_file(path), expected)


def hash_problem(path: Path, actual: str, expected: str) -> str | None:
    return None if actual == expected else \
        f"{path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}..."


def read_verified(directory: Path, manifest: Manifest, name: str) -> bytes:
    """A file the manifest lists, read once and checked against its recorded sha256: what is used is what was
    checked, and the file is not read twice (verify_files, then reading it)."""
    if name not in manifest.files:
        raise BundleError(f"{directory}: this bundle has no {name}")
    path = Path(directory) / name
    try:
        data = path.read_bytes()
    except OSError:
        raise BundleError(f"{path}: missing (listed in {MANIFEST})") from None
    problem = hash_problem(path, hashlib.sha256(data).hexdigest(), manifest.files[name])
    if problem:
        raise BundleError(problem)
    return data
