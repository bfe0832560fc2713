"""PEFT adapters in and out: `pt-build import` folds one into a bundle, and every bundle carries its prompt as one.

An adapter directory, as PEFT's `save_pretrained` writes it (mindnlp's port writes the same names;
tests/fixtures/peft_adapters/ hold real ones, written by PEFT 0.21.2 through
tests/fixtures/make_prefix_reference.py):

    adapter_config.json         peft_type, task_type, num_virtual_tokens, token_dim, num_layers,
                                num_attention_heads, num_transformer_submodules, modules_to_save, ...
    adapter_model.safetensors   "prompt_embeddings", and the head PEFT keeps in modules_to_save under
                                "base_model.<module>.*" (the adapter name is not in the saved keys; an
                                in-memory state dict's "modules_to_save.<adapter>." is accepted too)

What folds, exactly (the bundle's predictions equal PEFT's on the same inputs):

    PROMPT_TUNING   prompt_embeddings [P, hidden]: builder.models.prompts' prompt-tuning
    P_TUNING        the same: PEFT saves its prompt encoder's output (get_prompt_embedding_to_save
                    runs the MLP or LSTM), and an adapter loaded for inference (inference_mode)
                    puts that table in front of the text as it is, with no encoder
    PREFIX_TUNING   prompt_embeddings [P, layers * 2 * hidden]: builder.models.prompts' prefix-tuning from
                    layer 0; with prefix_projection the saved table is already the MLP's output

task_type FEATURE_EXTRACTION with PREFIX_TUNING, when the directory also holds PEFT_HEAD (the Linear over
the mean of the text rows, which PEFT has no class for): our mean pooling, the default bundle's.  PEFT's
FEATURE_EXTRACTION model drops token_type_ids, so BERT sentence pairs are refused.

task_type SEQ_CLS, on the backbone's *ForSequenceClassification head (`HEADS`), read through
our cls pooling: BERT's `classifier` reads the checkpoint's own pooler (frozen; PEFT neither trains
nor saves it); RoBERTa's head is `classifier.dense` (our pooler.*) then `classifier.out_proj` (our
classifier.*).  Anything else is a BuildError of one line naming the file and the field.

The other way, `write_adapter` writes a bundle's prompt and head as PEFT 0.21.2 writes them (the
same keys, the same config fields) when PEFT expresses the task exactly, and otherwise says why;
write_bundle records which in each task's details["peft"] (runtime.format.PEFT_DETAIL).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.numpy import load_file, save_file

from ptbundle.runtime.format import (CALIBRATION_DETAIL, PEFT_CALIBRATION, PEFT_CONFIG, PEFT_DETAIL, PEFT_DIR, PEFT_HEAD, PEFT_NOT_EXPRESSIBLE,
                                     PEFT_WEIGHTS, Manifest, Task, read_json_object)

from ..errors import BuildError
from ..models.prompts import PROMPTS, PromptSpec

PEFT_VERSION = "0.21.2"  # the PEFT whose adapter files write_adapter reproduces (the fixtures')
PROMPT_KEY = "prompt_embeddings"
METHODS = {"PROMPT_TUNING": "prompt-tuning", "P_TUNING": "prompt-tuning", "PREFIX_TUNING": "prefix-tuning"}
SUPPORTED = "pt-build import folds PROMPT_TUNING, P_TUNING and PREFIX_TUNING adapters"
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
# BERT's pooler is the checkpoint's (frozen, not saved): our cls pooling with backbone.pooler_weights().
HEADS = {
    "bert": {"base_model.classifier.weight": "classifier.weight", "base_model.classifier.bias": "classifier.bias"},
    "roberta": {"base_model.classifier.dense.weight": "pooler.weight",
                "base_model.classifier.dense.bias": "pooler.bias",
                "base_model.classifier.out_proj.weight": "classifier.weight",
                "base_model.classifier.out_proj.bias": "classifier.bias"},
}
MODULES_TO_SAVE = ["classifier", "score", "classifier", "score"]  # PEFT's SEQ_CLS default (it extends it twice)
OTHER_WEIGHT_FILES = ("adapter_model.bin", "adapter_model.ckpt", "adapter_model.pt", "adapter_model.pth")
CONFIG_SIZES = {"token_dim": ("hidden_size", "hidden size"), "num_layers": ("num_layers", "layers"),
                "num_attention_heads": ("num_heads", "attention heads")}  # adapter field -> EncoderConfig field


class Adapter(NamedTuple):
    """An adapter directory read and checked against a backbone."""

    spec: PromptSpec
    pooling: str
    values: dict  # PromptClassifier.load_head_state names -> float32 arrays
    num_labels: int
    config: dict  # adapter_config.json as read


# ---------------------------------------------------------------- in: an adapter directory -> PromptClassifier values


def read_adapter(directory, backbone) -> Adapter:
    """The prompt and head of a PEFT adapter directory, under our names, checked against `backbone`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BuildError(f"{directory}: no such adapter directory")
    config_path = directory / PEFT_CONFIG
    if not config_path.is_file():
        raise BuildError(f"{directory}: not a PEFT adapter directory (no {PEFT_CONFIG})")
    config = read_json_object(config_path, BuildError)
    method = check_config(config, config_path, backbone, (directory / PEFT_HEAD).is_file())
    weights = directory / PEFT_WEIGHTS
    tensors = read_tensors(weights)
    p, cfg = config["num_virtual_tokens"], backbone.config
    width = cfg.hidden_size * (2 * cfg.num_layers if method == "prefix-tuning" else 1)
    prompt = tensors.pop(PROMPT_KEY, None)
    if prompt is None:
        raise BuildError(f"{weights}: no {PROMPT_KEY!r} tensor (where PEFT saves the prompt)")
    if prompt.shape != (p, width):
        raise BuildError(f"{weights}: {PROMPT_KEY} has shape {prompt.shape}; {config['peft_type']} with"
                         f" num_virtual_tokens {p} on {backbone.name} needs {(p, width)}")
    if config["task_type"] == "FEATURE_EXTRACTION":  # the prefix alone; its head beside it (check_config)
        if tensors:
            raise BuildError(f"{weights}: unexpected tensor {sorted(tensors)[0]!r}: a FEATURE_EXTRACTION adapter"
                             f" holds {PROMPT_KEY} only")
        head = read_tensors(directory / PEFT_HEAD)
        pooling, values = "mean", {PROMPT_KEY: prompt, **read_head(head, directory / PEFT_HEAD, backbone, MEAN_HEAD)}
    else:
        pooling, values = "cls", {PROMPT_KEY: prompt, **read_head(tensors, weights, backbone)}
    return Adapter(PromptSpec.of(method, p), pooling, values, values["classifier.weight"].shape[0], config)


def check_config(config: dict, path: Path, backbone, mean_head: bool = False) -> str:
    """The prompt method the adapter folds into; a field that cannot be folded exactly is a BuildError naming it.
    `mean_head`: PEFT_HEAD is beside it (a FEATURE_EXTRACTION prefix then folds, with mean pooling)."""
    peft_type = config.get("peft_type")
    if peft_type not in METHODS:
        raise BuildError(f"{path}: peft_type {peft_type!r}: {REFUSED_TYPES.get(peft_type, SUPPORTED)}")
    task_type = config.get("task_type")
    if task_type == "FEATURE_EXTRACTION" and mean_head:
        if peft_type != "PREFIX_TUNING":
            raise BuildError(f"{path}: task_type 'FEATURE_EXTRACTION' with {PEFT_HEAD}: pt-build import folds it for"
                             f" PREFIX_TUNING only (PEFT puts a {peft_type} prompt's rows into the hidden states"
                             f" that {PEFT_HEAD} would average), not {peft_type}")
    elif task_type != "SEQ_CLS":
        why = REFUSED_TASKS.get(task_type, "pt-build import builds sequence classifiers: task_type SEQ_CLS, with the"
                                           " classifier saved from modules_to_save")
        raise BuildError(f"{path}: task_type {task_type!r}: {why}")
    submodules = config.get("num_transformer_submodules", 1)
    if submodules != 1:
        raise BuildError(f"{path}: num_transformer_submodules {submodules!r}: an encoder-decoder adapter;"
                         f" pt-build import folds encoder-only ones (1)")
    for name in ("num_virtual_tokens", *CONFIG_SIZES):
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BuildError(f"{path}: field {name!r} is {value!r}, not a positive integer")
    for name, (ours, what) in CONFIG_SIZES.items():
        want = getattr(backbone.config, ours)
        if config[name] != want:
            raise BuildError(f"{path}: {name} {config[name]}, but backbone {backbone.name} has {want} {what}"
                             f" (the adapter was trained on another model)")
    return METHODS[peft_type]


def read_tensors(path: Path) -> dict:
    """A safetensors file of the adapter (adapter_model.safetensors, PEFT_HEAD) as float32 arrays, keys without
    an adapter name."""
    directory = path.parent
    if not path.is_file():
        for other in OTHER_WEIGHT_FILES:
            if (directory / other).is_file():
                raise BuildError(f"{directory / other}: pt-build import reads {PEFT_WEIGHTS} only; re-save the"
                                 f" adapter with safetensors (PEFT: save_pretrained(dir, safe_serialization=True))")
        raise BuildError(f"{directory}: missing {path.name}")

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for bad files
        raise BuildError(f"{path}: cannot read safetensors ({first_line(e)})") from None
    out = {}
    for key, value in tensors.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise BuildError(f"{path}: tensor {key!r} is {value.dtype}, not floating point")
        out[re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)] = np.asarray(value, np.float32)
    return out


def read_head(tensors: dict, path: Path, backbone, names: dict | None = None) -> dict:
    """The classifier (and pooler) of the backbone's *ForSequenceClassification, under our names; with `names`
    (MEAN_HEAD) the Linear of PEFT_HEAD instead."""
    model_type, h = backbone.config.model_type, backbone.config.hidden_size
    seq_cls = names is None
    names = HEADS.get(model_type) if seq_cls else names
    if names is None:
        raise BuildError(f"{path}: no PEFT sequence-classification head is known for model_type {model_type!r}"
                         f" (known: {', '.join(HEADS)})")
    missing = [k for k in names if k not in tensors]
    if missing and not seq_cls:
        raise BuildError(f"{path}: no tensor {missing[0]!r} (the head holds {' and '.join(names)})")
    if missing:
        other = next((t for t, n in HEADS.items() if t != model_type and all(k in tensors for k in n)), None)
        raise BuildError(f"{path}: no classifier tensor {missing[0]!r} (a SEQ_CLS adapter saves its head from"
                         f" modules_to_save)" + (f"; it holds a {other} head, the backbone is {model_type}"
                                                 if other else ""))
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise BuildError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} in all): " + (
            f"a prompt-learning SEQ_CLS adapter holds {PROMPT_KEY} and the {model_type} classifier only" if seq_cls
            else f"the head holds {' and '.join(names)} only"))
    values = {ours: tensors[key] for key, ours in names.items()}
    n = values["classifier.weight"].shape[0] if values["classifier.weight"].ndim == 2 else 0
    shapes = {"classifier.weight": (n, h), "classifier.bias": (n,), "pooler.weight": (h, h), "pooler.bias": (h,)}
    for key, ours in names.items():
        if values[ours].shape != shapes[ours]:
            raise BuildError(f"{path}: {key} has shape {values[ours].shape}, expected {shapes[ours]}"
                             f" (hidden size {h})")
    if n < 2:
        raise BuildError(f"{path}: the classifier has {n} output(s); pt-build import builds classifiers of 2 or"
                         f" more labels")
    if seq_cls and "pooler.weight" not in values:  # BERT: the checkpoint's own pooler, frozen
        pooler = backbone.pooler_weights()
        if pooler is None:
            raise BuildError(f"backbone {backbone.path}: no pooler weights, so {model_type}'s sequence classifier"
                             f" would start a random one: PEFT's predictions cannot be reproduced")
        values["pooler.weight"], values["pooler.bias"] = (np.asarray(a, np.float32) for a in pooler)
    return values


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


# ---------------------------------------------------------------- out: a bundle's peft/ directory


def loses_token_types(pair: bool, backbone) -> bool:
    """PEFT's FEATURE_EXTRACTION model drops token_type_ids: sentence pairs on a backbone that reads them differ."""
    return pair and backbone.config.type_vocab_size > 1


def not_expressible(net, task: Task, backbone) -> str | None:
    """Why PEFT cannot hold this task's prompt and head with the same predictions, or None if it can."""
    spec = net.spec
    if task.kind != "soft":
        return "hard prompt (a text template, not a learned prompt)"
    if spec is None:
        return "several tasks in one graph (a PEFT adapter holds one)"
    method = PROMPTS[spec.method]
    why = method.peft_refusal(spec)  # the method's own capability (builder.models.prompts)
    if why is not None:
        return why
    if task.pooling == "mean":  # a FEATURE_EXTRACTION prefix, its head in PEFT_HEAD
        if method.peft_type != "PREFIX_TUNING":
            return (f"mean pooling with {spec.method} (PEFT's sequence-classification heads read the first"
                    f" position; a FEATURE_EXTRACTION adapter with {PEFT_HEAD} holds a prefix only)")
        if loses_token_types(task.pair, backbone):
            return "mean pooling of sentence pairs (PEFT's FEATURE_EXTRACTION model drops token_type_ids)"
        return None
    if task.pooling != "cls":
        return f"{task.pooling} pooling (PEFT's sequence-classification heads read the first position)"
    model_type = backbone.config.model_type
    if model_type not in HEADS:
        return f"no PEFT sequence-classification head is known for model_type {model_type!r}"
    if "pooler.weight" not in HEADS[model_type].values():  # the checkpoint's pooler: PEFT neither trains nor saves it
        pooler, state = backbone.pooler_weights(), net.head_state()
        if pooler is None or not (np.array_equal(state["pooler.weight"], pooler[0])
                                  and np.array_equal(state["pooler.bias"], pooler[1])):
            return (f"a trained pooler ({model_type}'s sequence classifier uses the checkpoint's own, which a PEFT"
                    f" adapter does not carry)")
    return None


def write_adapter(directory, net, task: Task, backbone) -> str:
    """Write `net`'s prompt and head into `directory` as a PEFT adapter when PEFT expresses them exactly; return
    what the task's details["peft"] records: the directory's name, or "not expressible: <why>" (nothing written)."""
    why = not_expressible(net, task, backbone)
    if why is not None:
        return PEFT_NOT_EXPRESSIBLE + why

    directory = Path(directory)
    directory.mkdir()
    state = net.folded_state()  # a prefix's reparameterization applied, as PEFT saves it

    def save(names: dict, name: str):
        save_file({key: np.ascontiguousarray(state[ours], np.float32) for key, ours in names.items()},
                  str(directory / name), metadata={"format": "pt"})

    mean = task.pooling == "mean"
    save({PROMPT_KEY: PROMPT_KEY, **({} if mean else HEADS[backbone.config.model_type])}, PEFT_WEIGHTS)
    if mean:
        save(MEAN_HEAD, PEFT_HEAD)
    config = adapter_config(net.spec, backbone, "FEATURE_EXTRACTION" if mean else "SEQ_CLS")
    (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    if CALIBRATION_DETAIL in task.details:  # PEFT ignores files it does not know; pt-build merge reads it
        (directory / PEFT_CALIBRATION).write_text(json.dumps(task.details[CALIBRATION_DETAIL], indent=1))
    return directory.name


def adapter_config(spec: PromptSpec, backbone, task_type: str = "SEQ_CLS") -> dict:
    """adapter_config.json with the fields PEFT 0.21.2 writes for this method and task (inference_mode: as it
    saves them; FEATURE_EXTRACTION saves no modules)."""
    cfg = backbone.config
    config = {"auto_mapping": None, "base_model_name_or_path": backbone.name, "inference_mode": True,
              "modules_to_save": list(MODULES_TO_SAVE) if task_type == "SEQ_CLS" else None,
              "num_attention_heads": cfg.num_heads, "num_layers": cfg.num_layers, "num_transformer_submodules": 1,
              "num_virtual_tokens": spec.virtual_tokens, "peft_version": PEFT_VERSION, "revision": None,
              "task_type": task_type, "token_dim": cfg.hidden_size}
    if spec.method == "prefix-tuning":  # the table is saved folded: a plain prefix (prefix_projection false)
        return {**config, "peft_type": "PREFIX_TUNING", "encoder_hidden_size": cfg.hidden_size, "init_weights": None,
                "prefix_projection": False}
    # prompt_tuning_init only decides where training starts; RANDOM needs no tokenizer to load
    return {**config, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
            "tokenizer_kwargs": None, "tokenizer_name_or_path": None}


def bundle_adapter(bundle_dir, net, manifest: Manifest, backbone) -> Manifest:
    """Write peft/ into a bundle being assembled when it can hold one; `manifest` with every task's details["peft"]."""
    if manifest.multi_task:
        why = PEFT_NOT_EXPRESSIBLE + "several tasks in one graph (a PEFT adapter holds one prompt and head)"
        status = {t.name: why for t in manifest.tasks}
    else:
        status = {manifest.only.name: write_adapter(Path(bundle_dir) / PEFT_DIR, net, manifest.only, backbone)}
    for task in manifest.tasks:
        manifest = manifest.replace_task(task.name, details={**task.details, PEFT_DETAIL: status[task.name]})
    return manifest
