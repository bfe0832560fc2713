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
from mindspore import Tensor
from safetensors.numpy import load_file

from ptbundle.runtime.adapter import is_adapter
from ptbundle.runtime.format import (CALIBRATION_DETAIL, GRAPHS, PEFT_CALIBRATION, PROMPT, TABLE_PREFIX,
                                     TOKENIZER, TRAINING_LOG, Manifest, Task, parse_bundle_spec, read_json_object,
                                     read_tables, task_rows, union_ranges, verify_files,
                                     well_formed_ranges)
from ptbundle.runtime.onnx_backend import OnnxModel

from ..backbones.backbone import load_backbone
from ..bundles.classifier import write_bundle
from ..bundles.manifest import backbone_info
from ..bundles.peft import read_adapter
from ..bundles.writer import check_replaceable
from ..errors import BuildError
from ..families import family_of
from ..families.encoder import ENCODER
from ..graphs.quantize import Int8Inputs
from ..graphs.targets import probe_inputs
from ..models.classifier import PromptClassifier, TaskHead, TaskTableError
from ..models.device import eager, use_device
from ..models.prompts import PROMPTS, PromptSpec
from ..training.hard import NORMALIZED_HEADS
from .import_adapter import adapter_task, label_names
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
    if name is not None and manifest.several:
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
            tables = {k: v for k, v in state.items() if k.startswith(TABLE_PREFIX)}
            own = (task_rows(tables, i) if tables else  # its rows of the tables; before they were, its own arrays
                   {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(task.name + "/")})
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


def read_adapter_source(spec: str, backbone, max_length: int) -> SourceTask:
    """One PEFT adapter given on the command line as a task: named NAME= or after its directory, labels
    LABEL_0.. (transformers' default; `pt-build import --labels` then merge the bundle to name them)."""
    name, path = parse_spec(spec)
    adapter = read_adapter(path, backbone)
    task = adapter_task(adapter, path, name or path.name, label_names(None, None, adapter.num_labels, path),
                        False, max_length, {})
    calibration = path / PEFT_CALIBRATION  # written beside a bundle's own adapter (builder.bundles.peft)
    if calibration.is_file():
        task = task.replace(details={**task.details, CALIBRATION_DETAIL: read_json_object(calibration, BuildError)})
    return SourceTask(task, adapter.values, None, path, 0)


def int8_ranges(tasks: list) -> Int8Inputs:
    """What the merged int8 graph is made from: every task's recorded activation ranges, joined (union_ranges)."""
    for t in tasks:
        ranges = t.task.details.get(CALIBRATION_DETAIL)
        if ranges is None:
            raise BuildError(f"{t.bundle}: task {t.task.name!r} records no int8 calibration ranges (its bundle has no"
                             f" int8 graph, or was built before they were recorded): rebuild it with --quantize int8,"
                             f" or merge without --quantize int8")
        if not well_formed_ranges(ranges):
            raise BuildError(f"{t.bundle}: task {t.task.name!r}: its int8 calibration ranges are not"
                             f" {{node: [min, max]}}")
    return Int8Inputs([], {}, union_ranges([t.task.details[CALIBRATION_DETAIL] for t in tasks]))


def merge(specs: list, destination: Path, backbone_path, device: str, log, add: bool = False,
          max_length: int = 128, quantize: bool = False) -> Manifest:
    """Read the bundles and PEFT adapters, build the merged classifier on the backbone, and write the bundle; its
    manifest back.  With `add`, the first spec is a merged bundle the others join: its task tables keep their
    shapes where the new tasks fit, so its tasks' outputs stay the same to the bit (checked).  With `quantize`,
    an int8 graph too, its scales from the ranges each task records (no training data needed)."""
    check_replaceable(Path(destination))
    manifests, per_spec = {}, []  # the tasks of each spec, in command-line order (adapters' once the backbone is read)
    for k, spec in enumerate(specs):
        path = parse_spec(spec)[1]
        if path.resolve() == Path(destination).resolve() and not (add and k == 0):
            raise BuildError(f"--out {destination}: one of the bundles being merged; write the merge elsewhere")
        if path.is_dir() and is_adapter(path):
            per_spec.append(spec)
            continue
        manifest, own = read_source(spec)
        manifests[path] = manifest
        per_spec.append(own)
    if add and (not manifests or next(iter(manifests)) != parse_spec(specs[0])[1]):
        raise BuildError(f"--add {specs[0]}: not a bundle")
    if add and not next(iter(manifests.values())).multi_task:
        raise BuildError(f"--add {specs[0]}: a one-task bundle, not a merged one; merge it with the new tasks"
                         f" into --out instead")
    if manifests:
        check_compatible(manifests)

    use_device(device)
    backbone = load_backbone(backbone_path)
    check_replaceable(Path(destination), backbone.sha256)
    first = next(iter(manifests.values()), None)
    if first is not None and backbone.sha256 != first.backbone.sha256:
        raise BuildError(f"--backbone {backbone.path}: sha256 {backbone.sha256[:12]} is not the bundles' backbone"
                         f" ({first.backbone.name}, {first.backbone.sha256[:12]})")
    tasks = [t for own in per_spec for t in ([read_adapter_source(own, backbone, max_length)]
                                             if isinstance(own, str) else own)]
    names = [t.task.name for t in tasks]
    seen = set()
    for name in names:
        if name in seen:
            where = ", ".join(str(t.bundle) for t in tasks if t.task.name == name)
            raise BuildError(f"task name {name!r} appears twice ({where}): name them with NAME=BUNDLE")
        seen.add(name)
    int8 = int8_ranges(tasks) if quantize else None
    heads = [TaskHead(t.task.name, PromptSpec.recorded(t.task.prompt_method, t.task.num_virtual_tokens, t.task.details),
                      len(t.task.labels), t.task.pooling, t.task.head in NORMALIZED_HEADS) for t in tasks]
    base = parse_spec(specs[0])[1] if add else None
    try:
        net = family_of(backbone).multitask(backbone, heads, [t.state for t in tasks])
    except TaskTableError as e:  # say which source the task came from
        where = next(t.bundle for t in tasks if t.task.name == e.task)
        raise BuildError(f"{where}: {PROMPT}: {e}") from e
    # The tables are sized by their tasks, so the bundle joined keeps its shape unless a new task needs more.
    grown = add and net.shape != net.shape_of(backbone.config, [h for h, t in zip(heads, tasks) if t.bundle == base])
    log(f"merging {len(tasks)} tasks on {backbone.name}: {net.slots} prompt slots, prefixes of {net.past_len}"
        + (f"; {len(tasks) - sum(t.bundle == base for t in tasks)} added to {base}" if add else "")
        + ("; its tables grow for them, so its tasks' outputs may move in the last bits" if grown else ""))
    pad_id = first.pad_id if first is not None else backbone.config.pad_token_id
    manifest = Manifest(tasks=tuple(t.task for t in tasks), pad_id=pad_id,
                        backbone=first.backbone if first is not None else backbone_info(backbone), device=device,
                        task_tables=True)

    def against_sources(directory: Path) -> dict:
        worst, checked = check_sources(OnnxModel(directory / GRAPHS["onnx"], tables=net.tables), tasks, backbone,
                                       pad_id, exact=base if add and not grown else None)
        return {"sources": worst, "sources_checked": checked}

    return write_bundle(destination, net, backbone, manifest, {t.task.name: t.curve for t in tasks}, int8=int8,
                        verify=against_sources)


SOURCE_SAMPLE = 16  # sources whose own graphs a merge runs its tasks against (every kind among them)


def source_sample(tasks: list, base) -> list:
    """Indices of the tasks checked against their sources: every task of `base` (one graph runs them all, the
    bundle --add joins), the first task of each kind (method, layer, length, pooling, head), then evenly spaced others, up to
    SOURCE_SAMPLE sources."""
    chosen = [i for i, t in enumerate(tasks) if base is not None and t.bundle == base]
    kinds, sources = set(), set()
    for i, t in enumerate(tasks):
        kind = (t.task.prompt_method, t.task.num_virtual_tokens, json.dumps(t.task.details, sort_keys=True,
                default=str), t.task.pooling, t.task.head)
        if kind not in kinds and t.bundle != base and len(sources) < SOURCE_SAMPLE:
            kinds.add(kind)
            sources.add(t.bundle)
            chosen.append(i)
    step = max(1, len(tasks) // SOURCE_SAMPLE)
    for i in range(0, len(tasks), step):
        if len(sources) >= SOURCE_SAMPLE:
            break
        if i not in chosen and tasks[i].bundle != base:
            sources.add(tasks[i].bundle)
            chosen.append(i)
    return sorted(chosen)


def source_model(t: SourceTask, backbone):
    """What a task's rows must equal: its own bundle's ONNX graph, or for an adapter the net `pt-build import`
    would build of it (an adapter has no graph of its own)."""
    if not is_adapter(t.bundle):
        return OnnxModel(t.bundle / GRAPHS["onnx"], tables=read_tables(t.bundle / PROMPT))
    spec = PromptSpec.recorded(t.task.prompt_method, t.task.num_virtual_tokens, t.task.details)
    net = PromptClassifier(ENCODER.model(backbone), spec.virtual_tokens, len(t.task.labels), t.task.pooling, spec=spec)
    net.load_head_state(t.state)
    net.set_train(False)

    def run(ids, mask, types, task_ids=None):
        with eager():
            return net(Tensor(ids), Tensor(mask), Tensor(types)).asnumpy()
    return run


def check_sources(merged, tasks: list, backbone, pad_id: int, exact=None) -> tuple:
    """(max |logit difference|, tasks checked): a sample of the tasks (source_sample), their rows in batches
    that mix them, against their own bundle's graph (or adapter's net).  With `exact` (the bundle --add joins,
    its tables unchanged), its tasks' rows must equal its graph's to the bit.  `merged`: its ONNX graph, opened."""
    sample = source_sample(tasks, exact)
    models = {}
    worst = 0.0
    for seed in range(2):
        for ids, mask, types, picks in probe_inputs(backbone.config.vocab_size, pad_id, seed, tasks=len(sample)):
            task_ids = np.array(sample, np.int32)[picks]
            got = merged(ids, mask, types, task_ids)
            if exact is not None:  # the same batch through the bundle as it was: its tasks come first, as numbered
                before = sum(t.bundle == exact for t in tasks)
                rows = np.flatnonzero(task_ids < before)
                if exact not in models:
                    models[exact] = source_model(tasks[0], backbone)
                was = models[exact](ids, mask, types, np.where(task_ids < before, task_ids, 0))
                if not np.array_equal(got[rows, : was.shape[1]], was[rows]):
                    moved = float(np.abs(got[rows, : was.shape[1]] - was[rows]).max())
                    raise BuildError(f"--add: the tasks of {exact} would change (by {moved:.2e})")
            for i in sorted(set(task_ids.tolist())):
                t, rows = tasks[i], np.flatnonzero(task_ids == i)
                if t.bundle == exact:
                    continue
                if t.bundle not in models:
                    models[t.bundle] = source_model(t, backbone)
                model = models[t.bundle]
                multi = isinstance(model, OnnxModel) and "task_ids" in model.input_names
                own = np.full(len(rows), t.source_index, np.int32) if multi else None
                want = model(ids[rows], mask[rows], types[rows], own)[:, : len(t.task.labels)]
                worst = max(worst, float(np.abs(got[rows, : len(t.task.labels)] - want).max()))
    if not worst <= SOURCE_TOLERANCE:
        raise BuildError(f"the merged graph differs from the source bundles' graphs by {worst:.2e}"
                         f" (> {SOURCE_TOLERANCE})")
    return worst, len(sample)

