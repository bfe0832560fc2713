"""`pt-run`: serve a bundle from the command line."""

from __future__ import annotations

import json

import click

from .backends import BACKENDS
from .errors import InputError, PtbundleError
from .format import DEVICES

DEFAULT_BUNDLE = "exports/mr-soft"


class ErrorsAsMessages(click.Group):
    """A click group whose commands report `PtbundleError`s as `Error: message` and exit 1.

    In the group, not in `main()`: click's test runner invokes the group, so
    the tests see exactly what a user sees.  pt-build uses it too.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PtbundleError as e:
            raise click.ClickException(str(e)) from e


def read_lines(stream, name: str, pair: bool = False) -> list:
    """One text per line (a pair: two texts split by a tab).

    Empty lines, undecodable bytes and pairs without exactly one tab are
    errors that name the line; nothing is silently dropped.
    """
    texts, problems = [], []
    for number, raw in enumerate(stream.read().split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{name}:{number}: not valid UTF-8 (byte {e.start + 1})")
            continue
        if not text.strip():
            problems.append(f"{name}:{number}: empty line")
            continue
        if pair:
            parts = text.split("\t")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                problems.append(f"{name}:{number}: expected two texts separated by one tab (a sentence-pair bundle)")
                continue
            text = tuple(parts)
        texts.append(text)
    # A final newline ends the last line; it does not start an empty one.
    if problems and problems[-1] == f"{name}:{number}: empty line" and raw == b"":
        problems.pop()
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise InputError(f"{len(problems)} input line(s) cannot be used, nothing was predicted:\n  {shown}")
    if not texts:
        raise InputError(f"{name}: no input lines")
    return texts


@click.group(cls=ErrorsAsMessages)
@click.version_option(package_name="ptbundle")
def cli():
    """Load ptbundle bundles and predict with them."""


@cli.command()
@click.argument("file", type=click.File("rb"))
@click.option("--bundle", "bundle_path", default=DEFAULT_BUNDLE, show_default=True, type=click.Path(),
              help="Bundle directory.")
@click.option("--format", "fmt", default="text", show_default=True, type=click.Choice(["text", "jsonl"]))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES))
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
              help="[default: onnxruntime on CPU, mindspore on GPU/Ascend]")
@click.option("--int8", is_flag=True, help="Use the bundle's int8 ONNX graph (pt-build export --quantize int8).")
def predict(file, bundle_path, fmt, batch_size, device, backend, int8):
    """Predict a label for each line of FILE ('-' for stdin).

    For a sentence-pair bundle each line holds the two texts separated by a tab.
    """
    bundle = load(bundle_path, device, backend, int8)
    name = getattr(file, "name", "<stdin>")
    texts = read_lines(file, "<stdin>" if name in ("<stdin>", "-") else name, bundle.is_pair)
    if bundle.is_pair:
        predictions = bundle.predict([a for a, _ in texts], [b for _, b in texts], batch_size=batch_size)
    else:
        predictions = bundle.predict(texts, batch_size=batch_size)
    out = []
    for text, p in zip(texts, predictions):
        shown = "\t".join(text) if bundle.is_pair else text
        if fmt == "jsonl":
            fields = {"text": text[0], "text_b": text[1]} if bundle.is_pair else {"text": text}
            out.append(json.dumps({**fields, **p.to_dict()}, ensure_ascii=False))
        else:
            out.append(f"{p.label}\t{p.probabilities[p.label]:.4f}\t{shown}")
    # Written once at the end: an error part-way leaves no half output.
    click.echo("\n".join(out))


@cli.command("eval")
@click.option("--bundle", "bundle_paths", multiple=True, required=True, type=click.Path(),
              help="A bundle to score; repeat to compare several.")
@click.option("--data", default="mr", show_default=True,
              help="'mr' (the shipped MR, canonical split) or a labelled .tsv/.csv/.jsonl file.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["dev", "test"]), help="MR split.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--text-b-column", default=None, help="Second text column, for sentence pairs.")
@click.option("--label-column", default="label", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None, help="[default: onnxruntime on CPU]")
@click.option("--int8", is_flag=True, help="Use each bundle's int8 ONNX graph.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also write a bar chart PNG here.")
def evaluate(bundle_paths, data, split, text_column, text_b_column, label_column, batch_size, backend, int8,
             as_json, plot):
    """Accuracy, macro-F1 and throughput of bundles side by side, on the same labelled data."""
    from pathlib import Path

    from .data import Columns
    from .evaluate import load_eval_examples, plot as plot_png, score, table

    examples, described = load_eval_examples(data, split, Columns(text_column, label_column, text_b_column))
    rows = []
    for path in bundle_paths:
        bundle = load(path, "CPU", backend, int8)
        metrics = score(bundle, examples, batch_size)
        rows.append({"bundle": path, "kind": bundle.manifest.kind_label, **metrics})
    if plot:
        plot_png(rows, described, Path(plot))
    if as_json:
        click.echo(json.dumps({"data": described, "n": len(examples), "results": rows}, indent=2))
    else:
        click.echo(f"{described}: {len(examples)} examples")
        click.echo(table(rows))


@cli.command()
@click.argument("bundle_path", metavar="BUNDLE", default=DEFAULT_BUNDLE)
def info(bundle_path):
    """Show what a bundle holds: task, labels, backbone, recipe, metrics, files."""
    from pathlib import Path

    from .format import Manifest

    m = Manifest.read(Path(bundle_path))
    head = f" ({m.head} head)" if m.kind == "hard" else ""
    click.echo(f"{bundle_path}: {m.kind} prompt bundle{head} for {m.task}")
    click.echo(f"  labels      {', '.join(m.labels)}")
    if m.template:
        click.echo(f"  template    {m.template}")
    bb = m.backbone
    click.echo(f"  backbone    {bb.name} ({bb.model_type}, {bb.layers}x{bb.hidden_size}), sha256 {bb.sha256[:12]}")
    click.echo(f"  prompt      {m.prompt_method}, {m.num_virtual_tokens} virtual tokens, {m.pooling} pooling,"
               f" {m.head} head, max length {m.max_length}")
    for label, texts in (m.details.get("verbalizer") or {}).items():
        click.echo(f"  verbalizer  {label}: " + " | ".join(texts))
    if m.recipe:
        click.echo("  recipe      " + ", ".join(f"{k}={v}" for k, v in m.recipe.items() if v is not None))
    metrics = m.metrics
    for split in ("dev", "test"):
        s = metrics.get(split)
        if s:
            click.echo(f"  {split:<11} accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f} (n={s['n']})")
    if "seconds_per_step_median" in metrics:
        click.echo(f"  training    {metrics.get('steps')} steps, {metrics['seconds_per_step_median']} s/step (median),"
                   f" {metrics.get('train_seconds')} s")
    for split, s in (metrics.get("int8") or {}).items():
        click.echo(f"  int8 {split:<6} accuracy {s['accuracy']:.4f} (fp32 {metrics[split]['accuracy']:.4f})")
    if m.export:
        click.echo("  parity      " + ", ".join(f"{k} {v:.1e}" for k, v in m.export.items()))
    click.echo(f"  created     {m.created}")
    click.echo("  versions    " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    click.echo("  files")
    for name, digest in m.files.items():
        click.echo(f"    {name:<22} sha256 {digest[:16]}")


def load(path, device, backend, int8):
    from .bundle import Bundle

    return Bundle.load(path, device=device, backend=backend, int8=int8)


def main():
    cli()
