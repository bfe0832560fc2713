"""What the PyTorch peer (bench/peer/peer_torch.py) needs, made by the project's own code.

    .venv/bin/python bench/peer/peer_inputs.py --bundle exports/mr-soft [--backbone DIR] [--data mr] [--epochs 1]
        [--peers course,same] [--course-bundle B]

The peer runs in another environment without ptbundle, so this writes, into
<results>/peer-inputs/, for it to read:
- data.json: the train/dev/test texts and gold labels of --data (ptbundle's
  readers), the bundle's label order and tokenizer, the backbone directory,
  the training batches of each epoch exactly as builder.train makes them
  (bucketed_batches with the recipe's seed), the learning rate of every
  step (builder.train.lr_schedule), the padding multiples of training and
  of the onnxruntime backend, the recipe (the default one with the bundle's
  prompt length), the path of runtime/text.py (the peer tokenizes and pads
  with it), and the peers to run at inference (`peers`, below);
- init.npz: the starting prompt and head of our training
  (builder.train.prepare, seed 0), so both sides start from the same point
  and see the same batches in the same order.

The peers (--peers), each a PEFT model over the same backbone:
- same: the bundle's prompt method, length and weights (prompt.safetensors).
  PEFT has prompt tuning and prefix tuning from layer 0; for anything else
  (a late prompt, a prefix from a higher layer, cls pooling) the peer is
  skipped and data.json says why;
- course: the course recipe's model, PEFT prompt tuning with 20 virtual
  tokens (mean pooling, linear head), with the weights of --course-bundle (a
  shallow prompt-tuning bundle on the same backbone, e.g. an mr-soft built
  with --method prompt-tuning), or of the bundle itself when it is one with
  20 tokens; otherwise random (PEFT's and torch's initialization, seed 0):
  the speed is the same, the accuracy chance.
Each peer that runs a bundle's weights gets that bundle's logits on 8 test
sentences (onnxruntime fp32, `Bundle.logits`): the peer checks its own
against them.  A bundle's backbone must be the backbone's (sha256), so the
peer runs the same weights as the bundle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

PEERS = ("course", "same")
COURSE_TOKENS = 20  # the course recipe's shallow prompt
CHECK_SENTENCES = 8


def split(examples) -> dict:
    return {"texts": [e.text for e in examples], "labels": [e.label for e in examples]}


def check_bundle(path, manifest: dict, backbone, dataset, data: str) -> None:
    """The bundle runs on `backbone` and predicts `dataset`'s labels from single texts."""
    if backbone.sha256 != manifest["backbone"]["sha256"]:
        raise click.ClickException(f"{path}: its backbone ({manifest['backbone']['name']}) is not {backbone.path}:"
                                   f" the peer would run other weights (give the bundle's with --backbone)")
    if list(dataset.labels) != manifest["labels"]:
        raise click.ClickException(f"{path}: labels {manifest['labels']} differ from {data}'s {list(dataset.labels)}")
    if dataset.is_pair:
        raise click.ClickException(f"{data}: sentence pairs; the peer runs single texts only")


def bundle_peer(path, manifest: dict, label: str, source: str, check_texts: list) -> dict:
    """A peer running a bundle's prompt and head, with the bundle's logits to check them against."""
    projection = (manifest.get("recipe") or {}).get("prefix_projection", 0)
    reference = common.open_bundle(path, backend="onnxruntime")
    return {"label": label, "method": manifest["prompt_method"], "virtual_tokens": manifest["num_virtual_tokens"],
            "projection": projection, "weights": str(Path(path).resolve() / common.PROMPT_FILE), "source": source,
            "check": {"texts": check_texts, "logits": reference.logits(check_texts).tolist(),
                      "reference": f"{Path(path).name}'s model.onnx (onnxruntime fp32)"}}


def peer_specs(names, bundle_path, manifest: dict, course_bundle, backbone, dataset, data: str) -> dict:
    """name -> what peer_torch.py runs: method, length, weights (or None: random) and the check, or why it is skipped."""
    test = [e.text for e in common.eval_split(dataset)[1]]
    check_texts = common.every_kth(test, max(1, len(test) // CHECK_SENTENCES))[:CHECK_SENTENCES]
    recipe = manifest.get("recipe") or {}
    method = f"{manifest['prompt_method']}, {manifest['num_virtual_tokens']} virtual tokens"
    specs = {}
    if "same" in names:
        reason = common.no_peft_equivalent(manifest["prompt_method"], recipe.get("layer", 0), manifest["pooling"])
        specs["same"] = {"label": f"same method ({method})", "skipped": reason} if reason else \
            bundle_peer(bundle_path, manifest, f"same method (PEFT {method}, the bundle's weights)", "the bundle",
                        check_texts)
    if "course" in names:
        def label(tokens: int, weights: str) -> str:
            return f"course (PEFT prompt-tuning, {tokens} virtual tokens, {weights})"

        shallow = manifest["prompt_method"] == "prompt-tuning" and manifest["num_virtual_tokens"] == COURSE_TOKENS \
            and manifest["pooling"] == "mean"
        if course_bundle:
            course = common.read_manifest(course_bundle)
            check_bundle(course_bundle, course, backbone, dataset, data)
            if course["prompt_method"] != "prompt-tuning" or course["pooling"] != "mean":
                raise click.ClickException(f"--course-bundle {course_bundle}: {course['prompt_method']} with "
                                           f"{course['pooling']} pooling; the course model is prompt-tuning, mean")
            specs["course"] = bundle_peer(course_bundle, course, label(course["num_virtual_tokens"],
                                                                       f"{Path(course_bundle).name}'s weights"),
                                          str(course_bundle), check_texts)
        elif shallow:
            specs["course"] = bundle_peer(bundle_path, manifest, label(COURSE_TOKENS, "the bundle's weights"),
                                          "the bundle", check_texts)
        else:
            specs["course"] = {"label": label(COURSE_TOKENS, "random weights"), "method": "prompt-tuning",
                               "virtual_tokens": COURSE_TOKENS, "projection": 0, "weights": None,
                               "source": "random: PEFT's and torch's initialization, seed 0 (accuracy is chance)"}
    return specs


def write_inputs(out: Path, bundle_path, manifest: dict, backbone, dataset, data: str, recipe, epochs: int,
                 peers: dict | None = None, train_pad_multiple: int | None = None) -> dict:
    """data.json and init.npz for the peer: `recipe` trained for `epochs` on `dataset`, our way."""
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
                 "tokenizer": str(Path(bundle_path).resolve() / common.TOKENIZER_FILE),
                 "text_module": common.TEXT_MODULE_FILE,
                 "train_pad_multiple": train_pad_multiple or common.TRAIN_PAD_MULTIPLE,
                 "infer_pad_multiple": common.ONNX_PAD_MULTIPLE,
                 "lr_schedules": schedules, "train_batches": [[b.tolist() for b in epoch] for epoch in batches],
                 "train": split(dataset.train), "dev": split(dataset.dev), "test": split(common.eval_split(dataset)[1]),
                 "peers": peers or {}}
    (out / "data.json").write_text(json.dumps(data_json) + "\n")
    return data_json


@click.command()
@common.options(backbone_help="The bundle's backbone [default: the shipped all-MiniLM-L6-v2].")
@click.option("--bundle", "bundle_path", default="exports/mr-soft", show_default=True)
@click.option("--epochs", default=1, show_default=True, help="Epochs of training batches to write.")
@click.option("--peers", default=",".join(PEERS), show_default=True,
              help="The inference peers: course (PEFT prompt tuning, 20 tokens), same (the bundle's method).")
@click.option("--course-bundle", default=None, type=click.Path(exists=True, file_okay=False),
              help="A shallow prompt-tuning bundle whose weights the course peer runs [default: the bundle if it is "
                   "one with 20 tokens, else random weights].")
def main(backbone, data, smoke, results, bundle_path, epochs, peers, course_bundle):
    names = [n for n in peers.split(",") if n]
    if set(names) - set(PEERS):
        raise click.ClickException(f"--peers {peers}: choose among {', '.join(PEERS)}")
    out = Path(results) / "peer-inputs"
    manifest = common.read_manifest(bundle_path)
    bb, dataset = common.load_backbone(backbone), common.load_data(data)
    check_bundle(bundle_path, manifest, bb, dataset, data)
    specs = peer_specs(names, bundle_path, manifest, course_bundle, bb, dataset, data)
    # The peer's training step is PEFT prompt tuning: the default recipe as a shallow prompt of the bundle's
    # length (a prefix's step time against PEFT's is bench/experiments/time_to_accuracy.py's business).
    recipe = common.recipe(virtual_tokens=manifest["num_virtual_tokens"], method="prompt-tuning")
    d = write_inputs(out, bundle_path, manifest, bb, dataset, data, recipe, 1 if smoke else epochs, specs)
    click.echo(f"{len(d['train']['texts'])} train, {len(d['dev']['texts'])} dev, {len(d['test']['texts'])} test "
               f"sentences, {len(d['train_batches'])} epoch(s) of {len(d['train_batches'][0])} batches -> {out}")
    for name, spec in specs.items():
        click.echo(f"peer {name}: {spec['label']}" + (f": skipped, {spec['skipped']}" if "skipped" in spec else ""))


if __name__ == "__main__":
    main()
