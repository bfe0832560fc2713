"""PEFT adapters in and out: `pt-build import` folds one into a bundle, and every bundle carries its prompt as one.

In: runtime.adapter reads an adapter directory (what it folds, exactly, is said there); `read_adapter` adds
what only the builder has, the backbone's own pooler for a SEQ_CLS head on BERT, and the prompt's PromptSpec.

Out: `write_adapter` writes a bundle's prompt and head as PEFT 0.21.2 writes them (the
same keys, the same config fields) when PEFT expresses the task exactly, and otherwise says why;
write_bundle records which in each task's details["peft"] (runtime.format.PEFT_DETAIL).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.numpy import save_file

from ptbundle.runtime import adapter as peft_in
from ptbundle.runtime.adapter import HEADS, MEAN_HEAD, PROMPT_KEY
from ptbundle.runtime.format import (CALIBRATION_DETAIL, PEFT_CALIBRATION, PEFT_CONFIG, PEFT_DETAIL, PEFT_DIR, PEFT_HEAD,
                                     PEFT_NOT_EXPRESSIBLE, PEFT_WEIGHTS, Manifest, Task)

from ..errors import BuildError
from ..models.prompts import PROMPTS, PromptSpec
from .manifest import backbone_info

PEFT_VERSION = "0.21.2"  # the PEFT whose adapter files write_adapter reproduces (the fixtures')
MODULES_TO_SAVE = ["classifier", "score", "classifier", "score"]  # PEFT's SEQ_CLS default (it extends it twice)


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
    read = peft_in.read(directory, backbone_info(backbone), BuildError)
    values = dict(read.values)
    if read.needs_pooler:  # BERT's sequence classifier: the checkpoint's own pooler, frozen
        pooler = backbone.pooler_weights()
        if pooler is None:
            raise BuildError(f"backbone {backbone.path}: no pooler weights, so {backbone.config.model_type}'s sequence"
                             f" classifier would start a random one: PEFT's predictions cannot be reproduced")
        values["pooler.weight"], values["pooler.bias"] = (np.asarray(a, np.float32) for a in pooler)
    return Adapter(PromptSpec.of(read.method, read.virtual_tokens), read.pooling, values, read.num_labels, read.config)


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
