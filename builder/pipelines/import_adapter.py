"""`pt-build import`: a PEFT adapter directory folded into a bundle (builder.bundles.peft reads it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ptbundle.runtime import adapter as peft_in
from ptbundle.runtime.format import PEFT_HEAD, PEFT_WEIGHTS, Manifest, Task
from ptbundle.runtime.text import load_tokenizer

from ..backbones.backbone import load_backbone
from ..bundles.classifier import write_bundle
from ..bundles.manifest import backbone_info
from ..bundles.peft import loses_token_types, read_adapter
from ..bundles.writer import check_replaceable
from ..errors import BuildError
from ..families import family_of
from ..models.device import use_device
from ..models.classifier import PromptClassifier
from ..recipe import check_positions
from ..training.forward import encode_split, evaluate

def import_adapter(adapter_dir, destination, backbone_path, dataset, labels, pair: bool, max_length: int,
                   device: str, log) -> Manifest:
    """Fold an adapter into a bundle at `destination` (graphs parity-checked as every bundle's), scored on
    `dataset`'s dev and test splits if given; the manifest written."""
    check_replaceable(Path(destination))
    use_device(device)
    backbone = load_backbone(backbone_path)
    check_replaceable(Path(destination), backbone.sha256)
    adapter = read_adapter(adapter_dir, backbone)
    weights = Path(adapter_dir) / (PEFT_HEAD if adapter.pooling == "mean" else PEFT_WEIGHTS)  # the classifier's file
    labels = label_names(labels, dataset, adapter.num_labels, weights)
    if dataset is not None:
        if pair and not dataset.is_pair:
            raise BuildError("--pair: the data has one text per example")
        pair = dataset.is_pair
    if adapter.pooling == "mean" and loses_token_types(pair, backbone):
        raise BuildError(f"{adapter_dir}: a FEATURE_EXTRACTION adapter on sentence pairs: PEFT's model drops"
                         f" token_type_ids, which {backbone.name} reads, so its predictions cannot be reproduced")
    if dataset is not None:
        dataset = dataclasses.replace(dataset, labels=labels)  # the classifier's order
    spec, cfg = adapter.spec, backbone.config
    check_positions(max_length, spec, backbone, BuildError)
    net = PromptClassifier(family_of(backbone).model(backbone), spec.virtual_tokens, adapter.num_labels,
                           adapter.pooling, spec=spec)
    net.load_head_state(adapter.values)
    net.set_train(False)
    config = adapter.config
    log(f"{adapter_dir}: {config['peft_type']} ({spec.virtual_tokens} virtual tokens), {adapter.num_labels} labels,"
        f" trained on {config.get('base_model_name_or_path')!r}; backbone {backbone.name}")
    metrics = score(net, backbone, dataset, max_length) if dataset is not None else {}
    task = adapter_task(adapter, adapter_dir, Path(destination).name, labels, pair, max_length, metrics)
    manifest = Manifest(tasks=(task,), pad_id=cfg.pad_token_id, backbone=backbone_info(backbone), device=device)
    return write_bundle(destination, net, backbone, manifest, [])


def adapter_task(adapter, adapter_dir, name: str, labels: tuple, pair: bool, max_length: int, metrics: dict) -> Task:
    """The manifest's task of a folded adapter: what it was made from, under `recipe`."""
    spec = adapter.spec
    return Task(name=name, kind="soft", labels=labels, pair=pair, max_length=max_length, pooling=adapter.pooling,
                head="linear", prompt_method=spec.method, num_virtual_tokens=spec.virtual_tokens,
                recipe=peft_in.recipe(adapter.config, adapter_dir), details=spec.details(), metrics=metrics)


def label_names(given, dataset, n: int, weights: Path) -> tuple:
    """--labels, else the data's labels, else transformers' default names; as many as the classifier has outputs."""
    if given:
        names = tuple(given)
        if len(set(names)) != len(names) or "" in names:
            raise BuildError(f"--labels {','.join(names)}: names must be distinct and non-empty")
        if len(names) != n:
            raise BuildError(f"--labels names {len(names)} labels; the classifier in {weights} has {n} outputs")
        if dataset is not None and set(names) != set(dataset.labels):
            raise BuildError(f"--labels {','.join(names)}: the data's labels are {', '.join(dataset.labels)}")
        return names
    if dataset is not None:
        if len(dataset.labels) != n:
            raise BuildError(f"the data has {len(dataset.labels)} labels ({', '.join(dataset.labels)}); the classifier"
                             f" in {weights} has {n} outputs")
        return tuple(dataset.labels)
    return peft_in.default_labels(n)


def score(net, backbone, dataset, max_length: int) -> dict:
    """Dev and test metrics of the folded net, tokenized as the bundle tokenizes."""
    tokenizer = load_tokenizer(backbone.tokenizer_path, max_length)
    return {split: evaluate(net, *encode_split(tokenizer, dataset, split), backbone.config.pad_token_id,
                            len(dataset.labels))
            for split in ("dev", "test") if getattr(dataset, split)}

