"""PEFT adapter directories as ptbundle reads them, without the builder: `pt-build import` and `pt-build merge` fold
what `read` returns into a bundle (builder.bundles.peft), and a task store serves it on an open graph of its
backbone, its prompt and head written into that graph's task tables (`table_rows`, runtime.store).

An adapter directory, as PEFT's `save_pretrained` writes it (mindnlp's port writes the same names;
tests/fixtures/peft_adapters/ hold real ones, written by PEFT 0.21.2 through
tests/fixtures/make_prefix_reference.py):

    adapter_config.json         peft_type, task_type, num_virtual_tokens, token_dim, num_layers,
                                num_attention_heads, num_transformer_submodules, modules_to_save, ...
    adapter_model.safetensors   "prompt_embeddings", and the head PEFT keeps in modules_to_save under
                                "base_model.<module>.*" (the adapter name is not in the saved keys; an
                                in-memory state dict's "modules_to_save.<adapter>." is accepted too)

What is read, exactly (a bundle folded from it predicts as PEFT does on the same inputs):

    PROMPT_TUNING   prompt_embeddings [P, hidden]: a shallow prompt in front of the text
    P_TUNING        the same: PEFT saves its prompt encoder's output (get_prompt_embedding_to_save
                    runs the MLP or LSTM), and an adapter loaded for inference (inference_mode)
                    puts that table in front of the text as it is, with no encoder
    PREFIX_TUNING   prompt_embeddings [P, layers * 2 * hidden]: keys and values in front of every layer's;
                    with prefix_projection the saved table is already the MLP's output

task_type FEATURE_EXTRACTION with PREFIX_TUNING, when the directory also holds PEFT_HEAD (the Linear over
the mean of the text rows, which PEFT has no class for): mean pooling, the default bundle's.  task_type
SEQ_CLS, on the backbone's *ForSequenceClassification head (`HEADS`), read through cls pooling: BERT's
`classifier` reads the checkpoint's own pooler (frozen; PEFT neither trains nor saves it, so `Adapter.values`
lacks it and the reader supplies it); RoBERTa's head is `classifier.dense` (our pooler.*) then
`classifier.out_proj` (our classifier.*).  Anything else is an error of one line naming the file and field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.numpy import load_file

from .format import (BACKBONE_POOLER, PEFT_CALIBRATION, PEFT_CONFIG, PEFT_HEAD, PEFT_WEIGHTS, TABLE_PREFIX,
                     BackboneInfo, Task, empty_tables, read_json_object, well_formed_ranges, write_task)

PROMPT_KEY = "prompt_embeddings"
METHODS = {"PROMPT_TUNING": "prompt-tuning", "P_TUNING": "prompt-tuning", "PREFIX_TUNING": "prefix-tuning"}
ROLES = {"prompt-tuning": "embedded", "prefix-tuning": "past"}  # where a method's prompt sits in the task tables
SUPPORTED = "ptbundle folds PROMPT_TUNING, P_TUNING and PREFIX_TUNING adapters"
REFUSED_TYPES = {  # peft_type -> why, where there is more to say than SUPPORTED
    "MULTITASK_PROMPT_TUNING": "its prompt depends on a task id given with each input; fold one task's adapter"
                               " at a time and join the bundles with pt-build merge",
}
REFUSED_TASKS = {  # task_type -> why
    "FEATURE_EXTRACTION": f"the adapter has no classification head (PEFT returns hidden states); train it with"
                          f" task_type SEQ_CLS (the head saved from modules_to_save), or put the Linear over the"
                          f" mean of the text rows beside it as {PEFT_HEAD} (weight, bias), as a bundle's peft/ does",
}
MEAN_HEAD = {"weight": "classifier.weight", "bias": "classifier.bias"}  # PEFT_HEAD's tensors -> our names
# backbone model_type -> {adapter tensor: our name}: the head of its *ForSequenceClassification as PEFT saves it.
# BERT's pooler is the checkpoint's (frozen, not saved): cls pooling with the backbone's own pooler weights.
HEADS = {
    "bert": {"base_model.classifier.weight": "classifier.weight", "base_model.classifier.bias": "classifier.bias"},
    "roberta": {"base_model.classifier.dense.weight": "pooler.weight",
                "base_model.classifier.dense.bias": "pooler.bias",
                "base_model.classifier.out_proj.weight": "classifier.weight",
                "base_model.classifier.out_proj.bias": "classifier.bias"},
}
FILES = (PEFT_CONFIG, PEFT_WEIGHTS, PEFT_HEAD, PEFT_CALIBRATION)  # what is read of an adapter directory
OTHER_WEIGHT_FILES = ("adapter_model.bin", "adapter_model.ckpt", "adapter_model.pt", "adapter_model.pth")
CONFIG_SIZES = {"token_dim": ("hidden_size", "hidden size"), "num_layers": ("layers", "layers"),
                "num_attention_heads": ("heads", "attention heads")}  # adapter field -> BackboneInfo field


class Adapter(NamedTuple):
    """An adapter directory read and checked against a backbone's shape."""

    method: str  # "prompt-tuning" or "prefix-tuning" (from layer 0)
    virtual_tokens: int
    pooling: str  # "mean" or "cls"
    values: dict  # prompt_embeddings and the head under our names (classifier.*, pooler.*), float32
    num_labels: int
    config: dict  # adapter_config.json as read
    needs_pooler: bool  # cls pooling through the checkpoint's own pooler, which the adapter does not hold (BERT)


def is_adapter(path: Path) -> bool:
    """A PEFT adapter directory (adapter_config.json, no bundle manifest)."""
    return (path / PEFT_CONFIG).is_file() and not (path / "manifest.json").is_file()


def read(directory, backbone: BackboneInfo, error: type) -> Adapter:
    """The prompt and head of a PEFT adapter directory, under our names, checked against `backbone`'s shape;
    a problem is `error` naming the file and field."""
    directory = Path(directory)
    if not directory.is_dir():
        raise error(f"{directory}: no such adapter directory")
    config_path = directory / PEFT_CONFIG
    if not config_path.is_file():
        raise error(f"{directory}: not a PEFT adapter directory (no {PEFT_CONFIG})")
    config = read_json_object(config_path, error)
    method = check_config(config, config_path, backbone, (directory / PEFT_HEAD).is_file(), error)
    weights = directory / PEFT_WEIGHTS
    tensors = read_tensors(weights, error)
    p = config["num_virtual_tokens"]
    width = backbone.hidden_size * (2 * backbone.layers if method == "prefix-tuning" else 1)
    prompt = tensors.pop(PROMPT_KEY, None)
    if prompt is None:
        raise error(f"{weights}: no {PROMPT_KEY!r} tensor (where PEFT saves the prompt)")
    if prompt.shape != (p, width):
        raise error(f"{weights}: {PROMPT_KEY} has shape {prompt.shape}; {config['peft_type']} with"
                    f" num_virtual_tokens {p} on {backbone.name} needs {(p, width)}")
    if config["task_type"] == "FEATURE_EXTRACTION":  # the prefix alone; its head beside it (check_config)
        if tensors:
            raise error(f"{weights}: unexpected tensor {sorted(tensors)[0]!r}: a FEATURE_EXTRACTION adapter"
                        f" holds {PROMPT_KEY} only")
        head = read_tensors(directory / PEFT_HEAD, error)
        pooling, values = "mean", read_head(head, directory / PEFT_HEAD, backbone, error, MEAN_HEAD)
    else:
        pooling, values = "cls", read_head(tensors, weights, backbone, error)
    return Adapter(method, p, pooling, {PROMPT_KEY: prompt, **values}, values["classifier.weight"].shape[0], config,
                   pooling == "cls" and "pooler.weight" not in values)


def check_config(config: dict, path: Path, backbone: BackboneInfo, mean_head: bool, error: type) -> str:
    """The prompt method the adapter folds into; a field that cannot be folded exactly is `error` naming it.
    `mean_head`: PEFT_HEAD is beside it (a FEATURE_EXTRACTION prefix then folds, with mean pooling)."""
    peft_type = config.get("peft_type")
    if peft_type not in METHODS:
        raise error(f"{path}: peft_type {peft_type!r}: {REFUSED_TYPES.get(peft_type, SUPPORTED)}")
    task_type = config.get("task_type")
    if task_type == "FEATURE_EXTRACTION" and mean_head:
        if peft_type != "PREFIX_TUNING":
            raise error(f"{path}: task_type 'FEATURE_EXTRACTION' with {PEFT_HEAD}: ptbundle folds it for"
                        f" PREFIX_TUNING only (PEFT puts a {peft_type} prompt's rows into the hidden states"
                        f" that {PEFT_HEAD} would average), not {peft_type}")
    elif task_type != "SEQ_CLS":
        why = REFUSED_TASKS.get(task_type, "ptbundle folds sequence classifiers: task_type SEQ_CLS, with the"
                                           " classifier saved from modules_to_save")
        raise error(f"{path}: task_type {task_type!r}: {why}")
    submodules = config.get("num_transformer_submodules", 1)
    if submodules != 1:
        raise error(f"{path}: num_transformer_submodules {submodules!r}: an encoder-decoder adapter;"
                    f" ptbundle folds encoder-only ones (1)")
    for name in ("num_virtual_tokens", *CONFIG_SIZES):
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise error(f"{path}: field {name!r} is {value!r}, not a positive integer")
    for name, (ours, what) in CONFIG_SIZES.items():
        want = getattr(backbone, ours)
        if config[name] != want:
            raise error(f"{path}: {name} {config[name]}, but backbone {backbone.name} has {want} {what}"
                        f" (the adapter was trained on another model)")
    return METHODS[peft_type]


def read_tensors(path: Path, error: type) -> dict:
    """A safetensors file of the adapter (adapter_model.safetensors, PEFT_HEAD) as float32 arrays, keys without
    an adapter name."""
    directory = path.parent
    if not path.is_file():
        for other in OTHER_WEIGHT_FILES:
            if (directory / other).is_file():
                raise error(f"{directory / other}: ptbundle reads {PEFT_WEIGHTS} only; re-save the adapter with"
                            f" safetensors (PEFT: save_pretrained(dir, safe_serialization=True))")
        raise error(f"{directory}: missing {path.name}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for bad files
        raise error(f"{path}: cannot read safetensors ({first_line(e)})") from None
    out = {}
    for key, value in tensors.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise error(f"{path}: tensor {key!r} is {value.dtype}, not floating point")
        out[re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)] = np.asarray(value, np.float32)
    return out


def read_head(tensors: dict, path: Path, backbone: BackboneInfo, error: type, names: dict | None = None) -> dict:
    """The classifier (and RoBERTa's pooler) of the backbone's *ForSequenceClassification, under our names; with
    `names` (MEAN_HEAD) the Linear of PEFT_HEAD instead."""
    model_type, h = backbone.model_type, backbone.hidden_size
    seq_cls = names is None
    names = HEADS.get(model_type) if seq_cls else names
    if names is None:
        raise error(f"{path}: no PEFT sequence-classification head is known for model_type {model_type!r}"
                    f" (known: {', '.join(HEADS)})")
    missing = [k for k in names if k not in tensors]
    if missing and not seq_cls:
        raise error(f"{path}: no tensor {missing[0]!r} (the head holds {' and '.join(names)})")
    if missing:
        other = next((t for t, n in HEADS.items() if t != model_type and all(k in tensors for k in n)), None)
        raise error(f"{path}: no classifier tensor {missing[0]!r} (a SEQ_CLS adapter saves its head from"
                    f" modules_to_save)" + (f"; it holds a {other} head, the backbone is {model_type}"
                                            if other else ""))
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise error(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} in all): " + (
            f"a prompt-learning SEQ_CLS adapter holds {PROMPT_KEY} and the {model_type} classifier only" if seq_cls
            else f"the head holds {' and '.join(names)} only"))
    values = {ours: tensors[key] for key, ours in names.items()}
    n = values["classifier.weight"].shape[0] if values["classifier.weight"].ndim == 2 else 0
    shapes = {"classifier.weight": (n, h), "classifier.bias": (n,), "pooler.weight": (h, h), "pooler.bias": (h,)}
    for key, ours in names.items():
        if values[ours].shape != shapes[ours]:
            raise error(f"{path}: {key} has shape {values[ours].shape}, expected {shapes[ours]} (hidden size {h})")
    if n < 2:
        raise error(f"{path}: the classifier has {n} output(s); ptbundle builds classifiers of 2 or more labels")
    return values


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def recipe(config: dict, directory) -> dict:
    """What a task folded from an adapter records of it (its manifest's recipe)."""
    return {"source": "peft", "adapter": str(directory), "peft_type": config["peft_type"],
            "task_type": config["task_type"], "base_model_name_or_path": config.get("base_model_name_or_path"),
            "peft_version": config.get("peft_version")}


def default_labels(n: int) -> tuple:
    return tuple(f"LABEL_{i}" for i in range(n))  # transformers' id2label default


def trained_on(config: dict, backbone: BackboneInfo) -> bool:
    """Whether the adapter names `backbone` as its base model: the last part of base_model_name_or_path (a hub id
    or a local path) is the backbone's name.  Its sizes are checked on reading; a name is all PEFT records."""
    base = config.get("base_model_name_or_path")
    return isinstance(base, str) and base.rstrip("/").split("/")[-1] == backbone.name.rstrip("/").split("/")[-1]


# ---------------------------------------------------------------- an adapter as one row of an open graph's tables


def table_rows(adapter: Adapter, tables: dict, poolings: dict, backbone_pooler: dict | None, path: Path,
               error: type) -> dict:
    """The adapter as one task of a merged graph whose task tables are `tables` (runtime.format; one row each,
    laid out as builder.models.classifier.task_tables lays out a task): the rows Shared.place writes.
    `poolings`: pooling name -> its index in the graph's task.pooling; `backbone_pooler`: the checkpoint's pooler
    (BACKBONE_POOLER) when the merged bundle records it.  What the graph has no room for is `error` saying why."""
    layers = tables[TABLE_PREFIX + "enters"].shape[1]
    slots = tables[TABLE_PREFIX + "slot_embeds"].shape[1] if TABLE_PREFIX + "slot_embeds" in tables else 0
    past = [i for i in range(layers) if f"{TABLE_PREFIX}past.{i}" in tables]
    q = tables[f"{TABLE_PREFIX}past.{past[0]}"].shape[3] if past else 0
    width = tables[TABLE_PREFIX + "classifier.bias"].shape[1]
    role, p = ROLES[adapter.method], adapter.virtual_tokens
    room = {"embedded": (slots, "prompt slots"), "past": (q if past and past[0] == 0 else 0, "prefix keys from layer 0")}
    if p > room[role][0]:
        raise error(f"{path}: its {p} virtual tokens do not fit the graph's {room[role][0]} {room[role][1]}")
    if adapter.num_labels > width:
        raise error(f"{path}: its {adapter.num_labels} labels do not fit the graph's {width}")
    if adapter.pooling not in poolings:
        raise error(f"{path}: {adapter.pooling} pooling; the graph runs {', '.join(sorted(poolings))} only")
    head = dict(adapter.values)
    if adapter.needs_pooler:
        if not backbone_pooler:
            raise error(f"{path}: a SEQ_CLS adapter on the checkpoint's own pooler, which the open graph's bundle"
                        f" does not record (merged before it did): merge it again with this version's pt-build")
        head["pooler.weight"], head["pooler.bias"] = (backbone_pooler[n] for n in BACKBONE_POOLER)
    rows = empty_tables(tables, 1)
    missing = [n for n in head if n != PROMPT_KEY and TABLE_PREFIX + n not in rows]
    if missing:
        raise error(f"{path}: the graph has no table for {missing[0]}")
    write_task(rows, 0, role, p, 0, head)
    rows[TABLE_PREFIX + "pooling"][0] = poolings[adapter.pooling]
    return rows


def check_int8(directory: Path, graph_ranges: dict | None, error: type) -> None:
    """An adapter runs on a merged int8 graph only within the activation ranges its scales were made from (the
    union of its tasks' CALIBRATION_DETAIL): its own, recorded beside it as a bundle's peft/ records them
    (PEFT_CALIBRATION), must fall inside them, or its activations would be clipped.  Else `error` naming why."""
    path = directory / PEFT_CALIBRATION
    fix = "serve fp32, or fold it with `pt-build merge --quantize int8`, which makes scales that cover it"
    if graph_ranges is None:
        raise error(f"{directory}: the open int8 graph's entries record no activation ranges to check it against; {fix}")
    if not path.is_file():
        raise error(f"{directory}: no {PEFT_CALIBRATION} (its int8 activation ranges, which a bundle's peft/ holds),"
                    f" so the open graph's int8 scales cannot be checked to cover it; {fix}")
    ranges = read_json_object(path, error)
    if not well_formed_ranges(ranges):
        raise error(f"{path}: not {{node: [min, max]}}")
    for role, (lo, hi) in sorted(ranges.items()):
        have = graph_ranges.get(role)
        if have is None or lo < have[0] or hi > have[1]:
            raise error(f"{path}: {role} ranges over [{lo:.4g}, {hi:.4g}], outside the open int8 graph's scales"
                        f" ({'none' if have is None else f'[{have[0]:.4g}, {have[1]:.4g}]'}); {fix}")


def task(adapter: Adapter, directory, name: str, max_length: int) -> Task:
    """The served task of an adapter: labels by transformers' default names, one text per input."""
    return Task(name=name, kind="soft", labels=default_labels(adapter.num_labels), pair=False, max_length=max_length,
                pooling=adapter.pooling, head="linear", prompt_method=adapter.method,
                num_virtual_tokens=adapter.virtual_tokens, recipe=recipe(adapter.config, directory))
