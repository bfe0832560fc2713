"""A classifier bundle (one task or merged tasks): every registered graph target written and parity-checked,
int8 if asked, tokenizer, prompt and head, training curve, the PEFT adapter where PEFT can express it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import save_file

from ptbundle.runtime.format import (BACKBONE_POOLER, CALIBRATION_DETAIL, GRAPHS, PROMPT, TOKENIZER, TRAINING_LOG,
                                     Manifest)
from ptbundle.runtime.text import load_tokenizer

from .peft import bundle_adapter
from .writer import write_atomically
from ..graphs.quantize import Int8Inputs, bf16_report, calibration_ranges, quantize_int8
from ..graphs.targets import TARGETS, check_parity, reference_outputs


def write_bundle(destination, net, backbone, manifest: Manifest, curve,
                 int8: Int8Inputs | None = None, verify: Callable | None = None) -> Manifest:
    """Write every file of the bundle, check it, then move it into place (builder.bundles.writer); return the
    manifest written.

    `manifest` describes the bundle; this adds what only the export knows
    (parity, files and hashes, versions, time) to a new Manifest, never
    changing the caller's.  With `int8` (builder.pipelines.export.int8_inputs), an int8 ONNX
    graph is added and its accuracy recorded as the task's metrics["int8"], and model.onnx's in bf16 on this
    CPU's bf16 units as metrics["bf16"] (or why not: builder.graphs.quantize.bf16_report).
    The prompt and head also go into peft/ as a PEFT adapter when PEFT can
    express them (builder.bundles.peft); each task's details["peft"] says whether.
    `verify(directory)` checks the written graphs further before the move
    (it raises, or returns entries for the manifest's export record).
    """

    def fill(tmp: Path) -> Manifest:
        references = reference_outputs(net, backbone.config.vocab_size, manifest.pad_id)
        parity, written = {}, manifest
        for target in TARGETS.values():
            path = target.export(net, tmp / target.file)
            parity[target.name] = check_parity(references, target.load(path, manifest.device, net.tables), target)
        if verify is not None:
            parity.update(verify(tmp))
        if int8 is not None:
            ranges = int8.ranges if int8.ranges is not None else calibration_ranges(tmp / GRAPHS["onnx"],
                                                                                    int8.calibration)
            report = quantize_int8(tmp / GRAPHS["onnx"], tmp / GRAPHS["onnx-int8"], manifest.pad_id, int8.eval_sets,
                                   ranges=ranges)
            for task in manifest.tasks:
                if manifest.multi_task:  # a merge has no data to score on (pt-run eval --int8 does); its tasks'
                    metrics = {k: v for k, v in task.metrics.items() if k != "int8"}  # own int8 figures are not its
                    written = written.replace_task(task.name, metrics=metrics)
                else:  # bf16 (the openvino backend) judged on the same splits, where this CPU has bf16 units
                    bf16 = bf16_report(tmp / GRAPHS["onnx"], manifest.pad_id, int8.eval_sets)
                    written = written.replace_task(task.name, metrics={**task.metrics, "int8": report, "bf16": bf16},
                                                   details={**task.details, CALIBRATION_DETAIL: ranges})
        # The tokenizer truncates per task at run time (runtime.text.load_tokenizer); the file is the backbone's.
        load_tokenizer(backbone.tokenizer_path, max(t.max_length for t in manifest.tasks)).save(str(tmp / TOKENIZER))
        # a merged net's task tables are stored here alone, with the backbone's pooler beside them
        extra = backbone_pooler(backbone) if manifest.multi_task else {}
        save_file({**net.head_state(), **extra}, str(tmp / PROMPT))
        (tmp / TRAINING_LOG).write_text(json.dumps(curve, indent=2))
        written = bundle_adapter(tmp, net, written, backbone)
        return written.replace(export={**manifest.export, **parity})

    return write_atomically(destination, fill)


def backbone_pooler(backbone) -> dict:
    """A merged bundle's record of the checkpoint's own pooler, where it has one (BACKBONE_POOLER): what a SEQ_CLS
    PEFT adapter on it reads, so that a task store can serve one on this bundle's graph."""
    pooler = backbone.pooler_weights()
    return {} if pooler is None else {n: np.ascontiguousarray(a, np.float32) for n, a in zip(BACKBONE_POOLER, pooler)}
