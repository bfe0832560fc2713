"""The manifest of a bundle built here: the backbone's identity and a one-task manifest (runtime.format holds
the format itself)."""

from __future__ import annotations

from ptbundle.runtime.format import BackboneInfo, Manifest, Task


def backbone_info(backbone) -> BackboneInfo:
    cfg = backbone.config
    return BackboneInfo(name=backbone.name, model_type=cfg.model_type, hidden_size=cfg.hidden_size,
                        layers=cfg.num_layers, heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                        vocab_size=cfg.vocab_size, sha256=backbone.sha256)


def base_manifest(dataset, backbone, recipe, device: str, pooling: str, /, **fields) -> Manifest:
    """A one-task manifest for this build; `fields` add or override what the task's kind knows (name, kind, head,
    metrics, the recipe fields it records...).  Builds name the task after its bundle: one name wherever it is
    served, predicted or merged."""
    task = dict(name=dataset.name, labels=tuple(dataset.labels), pair=dataset.is_pair, max_length=recipe.max_length,
                pooling=pooling, recipe=recipe.to_json())
    return Manifest(tasks=(Task(**{**task, **fields}),), pad_id=backbone.config.pad_token_id, device=device,
                    backbone=backbone_info(backbone))
