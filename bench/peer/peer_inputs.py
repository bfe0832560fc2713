"""What the PyTorch peer (bench/peer/peer_torch.py) needs, made by the project's own code.

    .venv/bin/python bench/peer/peer_inputs.py --bundle exports/mr-soft [--backbone DIR] [--data mr] [--epochs 1]

The peer runs in another environment without ptbundle, so this writes, into
<results>/peer-inputs/, for it to read:
- data.json: the train/dev/test texts and gold labels of --data (ptbundle's
  readers), the bundle's label order and files (prompt and head, tokenizer),
  the backbone directory, the training batches of each epoch exactly as
  builder.train makes them (bucketed_batches with the recipe's seed), the
  learning rate of every step (builder.train.lr_schedule), the padding
  multiples of training and of the onnxruntime backend, the recipe, and the
  path of runtime/text.py (the peer tokenizes and pads with it);
- init.npz: the starting prompt and head of our training
  (builder.train.prepare, seed 0), so both sides start from the same point
  and see the same batches in the same order.
The backbone's sha256 must equal the bundle's, so the peer runs the same
weights as the bundle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402


def split(examples) -> dict:
    return {"texts": [e.text for e in examples], "labels": [e.label for e in examples]}


def write_inputs(bundle_path: str, backbone_dir, data: str, out: Path, epochs: int) -> dict:
    manifest = common.read_manifest(bundle_path)
    backbone, dataset = common.load_backbone(backbone_dir), common.load_data(data)
    if backbone.sha256 != manifest["backbone"]["sha256"]:
        raise click.ClickException(f"the bundle's backbone ({manifest['backbone']['name']}) is not {backbone.path}:"
                                   f" the peer would run other weights (give the bundle's with --backbone)")
    if list(dataset.labels) != manifest["labels"]:
        raise click.ClickException(f"bundle labels {manifest['labels']} differ from {data}'s {list(dataset.labels)}")
    if dataset.is_pair:
        raise click.ClickException(f"{data}: sentence pairs; the peer runs single texts only")
    # The default recipe (what `pt-build export` trains), with the bundle's prompt length.
    recipe = common.recipe(virtual_tokens=manifest["num_virtual_tokens"])
    run = common.prepare(backbone, dataset, recipe)
    lengths = [len(e.ids) for e in run.splits["train"][0]]
    batches = common.epoch_batches(lengths, recipe.batch_size, recipe.seed, epochs)
    # train() sizes its lr schedule by len(train) // batch_size per epoch (the ragged batches
    # bucketed_batches drops make an epoch a few steps shorter)
    per_epoch = len(lengths) // recipe.batch_size
    schedules = {str(e): {"head": common.lr_schedule(recipe.head_lr, per_epoch * e, recipe.warmup),
                          "prompt": common.lr_schedule(recipe.prompt_lr, per_epoch * e, recipe.warmup)}
                 for e in range(1, epochs + 1)}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "init.npz", **run.net.head_state())
    data_json = {"data": data, "labels": manifest["labels"], "backbone": str(backbone.path),
                 "backbone_sha256": backbone.sha256, "recipe": recipe.to_json(), "pad_id": run.pad_id,
                 "head": str(Path(bundle_path).resolve() / common.PROMPT_FILE),
                 "tokenizer": str(Path(bundle_path).resolve() / common.TOKENIZER_FILE),
                 "text_module": common.TEXT_MODULE_FILE,
                 "train_pad_multiple": common.TRAIN_PAD_MULTIPLE, "infer_pad_multiple": common.ONNX_PAD_MULTIPLE,
                 "lr_schedules": schedules, "train_batches": [[b.tolist() for b in epoch] for epoch in batches],
                 "train": split(dataset.train), "dev": split(dataset.dev), "test": split(common.eval_split(dataset)[1])}
    (out / "data.json").write_text(json.dumps(data_json) + "\n")
    return data_json


@click.command()
@common.options(backbone_help="The bundle's backbone [default: the shipped all-MiniLM-L6-v2].")
@click.option("--bundle", "bundle_path", default="exports/mr-soft", show_default=True)
@click.option("--epochs", default=1, show_default=True, help="Epochs of training batches to write.")
def main(backbone, data, smoke, results, bundle_path, epochs):
    out = Path(results) / "peer-inputs"
    d = write_inputs(bundle_path, backbone, data, out, 1 if smoke else epochs)
    click.echo(f"{len(d['train']['texts'])} train, {len(d['dev']['texts'])} dev, {len(d['test']['texts'])} test "
               f"sentences, {len(d['train_batches'])} epoch(s) of {len(d['train_batches'][0])} batches -> {out}")


if __name__ == "__main__":
    main()
