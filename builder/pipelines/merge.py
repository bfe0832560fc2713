"""`pt-build merge`: bundles on one backbone become one multi-task bundle.

One graph (builder.models.classifier.MultiTaskClassifier) holds every task's prompt and head
over one copy of the frozen encoder; each row of a batch names its task, so
requests for different tasks share batches.  Each task keeps its labels,
template, recipe and recorded metrics.  The merged graphs are checked like
every graph (builder.graphs.targets.check_parity), and each task's rows in mixed batches
against the graph of the bundle it came from (`SOURCE_TOLERANCE`, recorded
as export["sources"]) before the bundle is moved into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from ptbundle.runtime.format import (GRAPHS, PROMPT, TOKENIZER, TRAINING_LOG, Manifest, Task, parse_bundle_spec,
                                     verify_files)
from ptbundle.runtime.onnx_backend import OnnxModel

from ..backbones.backbone import load_backbone
from ..bundles.classifier import write_bundle
from ..bundles.writer import check_replaceable
from ..errors import BuildError
from ..families.encoder import ENCODER
from ..graphs.targets import probe_inputs
from ..models.classifier import MultiTaskClassifier, TaskHead, task_tables
from ..models.device import use_device
from ..models.prompts import PROMPTS, PromptSpec
from ..training.hard import NORMALIZED_HEADS
SOURCE_TOLERANCE = 1e-4  # max |logit difference| of a task's rows from its own bundle's ONNX graph


@dataclass(frozen=True)
class SourceTask:
    task: Task
    state: dict  # prompt and head arrays, named as in a one-task bundle's prompt.safetensors
    curve: object  # its training log
    bundle: Path
    source_index: int  # the task's index in its own bundle's graph


def parse_spec(spec: str) -> tuple:
    """'NAME=PATH' (rename a one-task bundle's task) or 'PATH' -> (name or None, Path)."""
    name, path = parse_bundle_spec(spec)
    return name, Path(path)


def read_source(spec: str) -> tuple:
    """(manifest, [SourceTask]) of one bundle given on the command line, its files checked against their hashes."""
    name, path = parse_spec(spec)
    if not path.is_dir():
        raise BuildError(f"{path}: no such bundle directory")
    manifest = Manifest.read(path)
    verify_files(path, manifest, [PROMPT, TOKENIZER, GRAPHS["onnx"]])
    if name is not None and manifest.multi_task:
        raise BuildError(f"{spec}: NAME= renames the task of a one-task bundle; {path} holds"
                         f" {', '.join(manifest.task_names)}")
    state = load_file(str(path / PROMPT))
    log = path / TRAINING_LOG
    curves = json.loads(log.read_text()) if log.is_file() else None
    tasks = []
    for i, task in enumerate(manifest.tasks):
        if task.prompt_method not in PROMPTS or PROMPTS[task.prompt_method].table_role is None:
            mergeable = ", ".join(name for name, method in PROMPTS.items() if method.table_role is not None)
            raise BuildError(f"{path}: task {task.name!r} uses prompt method {task.prompt_method!r}; merge can fold"
                             f" {mergeable}")
        if manifest.multi_task:
            own = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(task.name + "/")}
            curve = (curves or {}).get(task.name)
        else:
            own, curve = state, curves
        tasks.append(SourceTask(task.replace(name=name) if name else task, own, curve, path, i))
    return manifest, tasks


def check_compatible(manifests: dict) -> None:
    """Same backbone (sha256), padding id and tokenizer file in every bundle; the message names the difference."""
    (first, m0), *rest = manifests.items()
    for path, m in rest:
        for what, a, b in (("backbone sha256", m0.backbone.sha256, m.backbone.sha256),
                           ("pad id", m0.pad_id, m.pad_id),
                           ("tokenizer.json sha256", m0.files.get(TOKENIZER), m.files.get(TOKENIZER))):
            if a != b:
                shown = (lambda v, mm: f"{str(v)[:12]} ({mm.backbone.name})") if "backbone" in what else \
                    (lambda v, mm: str(v)[:12])
                raise BuildError(f"cannot merge {first} and {path}: {what} differs ({shown(a, m0)} vs {shown(b, m)});"
                                 f" merged bundles share one backbone")


def merge(specs: list, destination: Path, backbone_path, device: str, log) -> Manifest:
    """Read the bundles, build the merged classifier on the backbone, and write the bundle; its manifest back."""
    check_replaceable(Path(destination))
    manifests, tasks = {}, []
    for spec in specs:
        manifest, own = read_source(spec)
        path = parse_spec(spec)[1]
        if path.resolve() == Path(destination).resolve():
            raise BuildError(f"--out {destination}: one of the bundles being merged; write the merge elsewhere")
        manifests[path] = manifest
        tasks += own
    check_compatible(manifests)
    names = [t.task.name for t in tasks]
    for name in names:
        if names.count(name) > 1:
            where = ", ".join(str(t.bundle) for t in tasks if t.task.name == name)
            raise BuildError(f"task name {name!r} appears twice ({where}): name them with NAME=BUNDLE")
    if len(tasks) < 2:
        raise BuildError("merge needs at least two tasks")
    first = next(iter(manifests.values()))

    use_device(device)
    backbone = load_backbone(backbone_path)
    check_replaceable(Path(destination), backbone.sha256)
    if backbone.sha256 != first.backbone.sha256:
        raise BuildError(f"--backbone {backbone.path}: sha256 {backbone.sha256[:12]} is not the bundles' backbone"
                         f" ({first.backbone.name}, {first.backbone.sha256[:12]})")
    heads = [TaskHead(t.task.name, PromptSpec.recorded(t.task.prompt_method, t.task.num_virtual_tokens, t.task.details),
                      len(t.task.labels), t.task.pooling, t.task.head in NORMALIZED_HEADS) for t in tasks]
    for head, t in zip(heads, tasks):
        try:
            task_tables(backbone.config, [head], [t.state])  # one task alone: an error names its bundle
        except ValueError as e:
            raise BuildError(f"{t.bundle}: {PROMPT}: {e}") from e
    net = MultiTaskClassifier(ENCODER.model(backbone), heads, [t.state for t in tasks])  # an encoder's tasks
    log(f"merging {len(tasks)} tasks ({', '.join(names)}) on {backbone.name}; {net.slots} prompt slots,"
        f" prefixes of {net.past_len}")
    manifest = Manifest(tasks=tuple(t.task for t in tasks), pad_id=first.pad_id, backbone=first.backbone,
                        device=device)

    def against_sources(directory: Path) -> dict:
        return {"sources": check_sources(directory / GRAPHS["onnx"], tasks, backbone.config.vocab_size, first.pad_id)}

    return write_bundle(destination, net, backbone, manifest, {t.task.name: t.curve for t in tasks},
                        verify=against_sources)


def check_sources(merged_graph: Path, tasks: list, vocab_size: int, pad_id: int) -> float:
    """Max |logit difference| of each task's rows, in batches that mix every task, from its own bundle's graph."""
    merged = OnnxModel(merged_graph)
    sources = {t.bundle: OnnxModel(t.bundle / GRAPHS["onnx"]) for t in tasks}
    multi = {t.bundle: "task_ids" in sources[t.bundle].input_names for t in tasks}
    worst = 0.0
    for seed in range(2):
        for ids, mask, types, task_ids in probe_inputs(vocab_size, pad_id, seed, tasks=len(tasks)):
            got = merged(ids, mask, types, task_ids)
            for i, t in enumerate(tasks):
                rows = np.flatnonzero(task_ids == i)
                if not len(rows):
                    continue
                own = np.full(len(rows), t.source_index, np.int32) if multi[t.bundle] else None
                want = sources[t.bundle](ids[rows], mask[rows], types[rows], own)[:, : len(t.task.labels)]
                worst = max(worst, float(np.abs(got[rows, : len(t.task.labels)] - want).max()))
    if not worst <= SOURCE_TOLERANCE:
        raise BuildError(f"the merged graph differs from the source bundles' graphs by {worst:.2e}"
                         f" (> {SOURCE_TOLERANCE})")
    return worst
