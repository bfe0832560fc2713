"""`pt-run`: serve a bundle from the command line."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from .backends import BACKENDS, PRECISIONS
from .bundle import Bundle
from .data import Columns
from .errors import BundleError, ErrorsAsMessages, InputError, PtbundleError
from .evaluate import check_examples, check_plot, load_eval_examples, plot as plot_png, score, table
from .format import (DEVICES, GRAPHS, MINDIR_CAPACITY, PEFT_DETAIL, PEFT_DIR, Manifest, file_problem,
                     parse_bundle_spec)
from .inputs import BOM, CHUNK_LINES, FORMATS, LineReader, chunks, format_of
from .protocol import Limits
from .serve import TaskStore, endpoints_of, run

DEFAULT_BUNDLE = "exports/mr-soft"


@click.group(cls=ErrorsAsMessages)
@click.version_option(package_name="ptbundle")
def cli():
    """Load ptbundle bundles and predict with them."""


@cli.command()
@click.argument("file", type=click.File("rb"))
@click.option("--bundle", "bundle_path", default=DEFAULT_BUNDLE, show_default=True, type=click.Path(),
              help="Bundle directory.")
@click.option("--task", default=None,
              help="The task of every line (a multi-task bundle); a JSONL line's \"task\" may only repeat it"
                   " [default: the only one, or each JSONL line's \"task\"].")
@click.option("--input-format", "input_format", default=None, type=click.Choice(FORMATS),
              help="text: a text per line (pairs: two texts split by a tab); jsonl: {\"text\", \"text_b\", \"task\"}"
                   " per line  [default: jsonl for a .jsonl file (any case), else text]")
@click.option("--format", "fmt", default="text", show_default=True, type=click.Choice(["text", "jsonl"]),
              help="Output format.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--chunk-lines", default=CHUNK_LINES, show_default=True, type=click.IntRange(1),
              help="Lines read, checked, length-sorted and predicted together (bounds memory).")
@click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES))
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
              help="[default: onnxruntime on CPU (openvino for bf16), mindspore on GPU/Ascend]")
@click.option("--int8", is_flag=True, help="Use the bundle's int8 ONNX graph (pt-build export --quantize int8).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="fp32 [default], int8 (as --int8), or bf16 on a CPU with bf16 units (the openvino extra).")
@click.option("--progress/--no-progress", default=None,
              help="Lines done on stderr every few seconds [default: when stderr is a terminal].")
def predict(file, bundle_path, task, input_format, fmt, batch_size, chunk_lines, device, backend, int8, precision,
            progress):
    """Predict a label for each line of FILE ('-' for stdin), in order, one output line per input line.

    FILE is read --chunk-lines lines at a time, so it may be of any size.
    Each chunk is checked whole before any of it is predicted: a bad line
    stops the run with its line number, and what was written before it is
    exactly the predictions of the chunks before its chunk (the message
    says which lines).  A file of at most --chunk-lines lines is all or nothing.
    """
    bundle = load(bundle_path, device, backend, int8, precision)
    name = getattr(file, "name", "<stdin>")
    name = "<stdin>" if name in ("<stdin>", "-") else name
    input_format = input_format or format_of(name)
    reader = LineReader({n: t.task.pair for n, t in bundle.tasks.items()}, input_format, task)
    show_task = bundle.manifest.several
    progress = sys.stderr.isatty() if progress is None else progress
    started = last = time.time()
    done = 0
    for rows in chunks(file, name, reader, chunk_lines):
        pairs = any(r.text_b is not None for r in rows)
        predictions = bundle.predict([r.text for r in rows], [r.text_b for r in rows] if pairs else None,
                                     batch_size=batch_size, task=[r.task for r in rows])
        lines = []
        for r, p in zip(rows, predictions):
            if fmt == "jsonl":
                fields = {"text": r.text} | ({"text_b": r.text_b} if r.text_b is not None else {})
                lines.append(json.dumps({**fields, **p.to_dict()}, ensure_ascii=False))
            else:
                shown = r.text if r.text_b is None else f"{r.text}\t{r.text_b}"
                lines.append(("" if not show_task else f"{r.task}\t") + f"{p.label}\t{p.probabilities[p.label]:.4f}\t{shown}")
        # A chunk is written whole once predicted: a later bad line leaves no half chunk.
        click.echo("\n".join(lines))
        done += len(rows)
        if progress and time.time() - last >= 2:
            last = time.time()
            click.echo(f"{done} lines, {done / (last - started):.0f} lines/s", err=True)


@cli.command()
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path())
@click.argument("prompt", required=False, default="-")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0),
              help="0: greedy (the likeliest token each step).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Sample from the smallest set of tokens this likely (with --temperature > 0).")
@click.option("--seed", default=None, type=int, help="Makes sampling reproducible.")
@click.option("--stop", multiple=True, help="Stop before this text (repeatable); it is not printed.")
@click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES))
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
              help="[default: onnxruntime on CPU, mindspore on GPU/Ascend]")
@click.option("--int8", is_flag=True, help="Use the bundle's int8 decoder graph (onnxruntime).")
def generate(bundle_path, prompt, max_new_tokens, temperature, top_p, seed, stop, device, backend, int8):
    """Generate text after PROMPT with a generation bundle, printing it as it comes.

    PROMPT is the text itself, or '-' (the default) to read it from stdin
    (so `pt-run generate BUNDLE - < question.txt` takes a file).  The
    bundle's template (e.g. chat markup) is put around it.  The mindspore
    backend runs decoder.mindir, whose KV cache has a fixed size (pt-run
    info shows it): prompt and new tokens must fit in it.
    """
    if prompt == "-":
        raw = sys.stdin.buffer.read()
        try:
            # The newline that ends a file, and a BOM some editors start one with, are no part of the prompt.
            prompt = raw.removeprefix(BOM).decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise click.ClickException(f"<stdin>: not valid UTF-8 (byte {e.start + 1})") from None
    bundle = load(bundle_path, device, backend, int8)
    for piece in bundle.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed, stop=stop, stream=True):
        click.echo(piece, nl=False)
        sys.stdout.flush()  # each piece as it comes, even into a pipe
    click.echo()


@cli.command()
@click.argument("bundle_specs", nargs=-1, metavar="[NAME=]BUNDLE...")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--max-batch", default=Limits.max_batch, show_default=True, type=click.IntRange(1),
              help="Texts gathered from concurrent requests (of any of a bundle's tasks) into one batch.")
@click.option("--group", default=Limits.group, show_default=True, type=click.IntRange(1),
              help="Texts per model call at most: a gathered batch runs in length-sorted groups of this size"
                   " (cut further where padding costs more than a call).")
@click.option("--max-wait-ms", default=Limits.max_wait * 1000, show_default=True, type=click.FloatRange(0),
              help="How long the first text of a batch waits for others, counted from its arrival.")
@click.option("--max-texts", default=Limits.max_texts, show_default=True, type=click.IntRange(1),
              help="Instances per request.")
@click.option("--max-chars", default=Limits.max_chars, show_default=True, type=click.IntRange(1),
              help="Characters per text.")
@click.option("--max-body-bytes", default=Limits.max_body, show_default=True, type=click.IntRange(1))
@click.option("--device", default="CPU", show_default=True, type=click.Choice(DEVICES))
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
              help="[default: onnxruntime on CPU (openvino for bf16), mindspore on GPU/Ascend]")
@click.option("--int8", is_flag=True, help="Serve the bundles' int8 ONNX graphs.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="fp32 [default], int8 (as --int8), or bf16 on a CPU with bf16 units (the openvino extra).")
@click.option("--task-store", type=click.Path(file_okay=False), default=None,
              help="A directory of bundles and PEFT adapters (served on a merged bundle's graph of their backbone),"
                   " all loaded at start, loaded and unloaded at run time through /v2/repository/... (the V2 model"
                   " repository extension).")
@click.option("--repository-token", default=None, envvar="PTBUNDLE_REPOSITORY_TOKEN",
              help="Bearer token the /v2/repository/... endpoints need (env PTBUNDLE_REPOSITORY_TOKEN).")
@click.option("--load-on-demand", is_flag=True,
              help="Load a store entry when a request names it, none at start (the request waits for the load).")
@click.option("--max-loaded", type=click.IntRange(1), default=None,
              help="At most this many store entries loaded: loading one more unloads the least recently used"
                   " (its requests in flight are answered) [default: no bound].")
def serve(bundle_specs, host, port, max_batch, group, max_wait_ms, max_texts, max_chars, max_body_bytes, device, backend,
          int8, precision, task_store, repository_token, load_on_demand, max_loaded):
    """Serve bundles over HTTP (KServe V1 protocol): POST /v1/models/TASK:predict {"instances": [...]}.

    A one-task bundle is served under its directory's name (NAME=BUNDLE
    renames it), each task of a merged bundle under its task name.  Texts of
    concurrent requests are batched together.  Needs the serve extra
    (pip install 'ptbundle[serve]').  SIGTERM answers the requests in flight, then exits.
    """
    for given, what in ((repository_token is not None, "--repository-token"), (load_on_demand, "--load-on-demand"),
                        (max_loaded is not None, "--max-loaded")):
        if given and task_store is None:
            raise InputError(f"{what} is about the task store: give --task-store DIR too")
    store = None if task_store is None else TaskStore(task_store, device, backend, precision_of(int8, precision),
                                                      repository_token, load_on_demand, max_loaded)
    specs = [parse_bundle_spec(s) for s in (bundle_specs or (() if store else (DEFAULT_BUNDLE,)))]
    bundles = [load(path, device, backend, int8, precision) for _, path in specs]
    limits = Limits(max_batch=max_batch, group=group, max_wait=max_wait_ms / 1000, max_body=max_body_bytes, max_texts=max_texts,
                    max_chars=max_chars)
    run(endpoints_of(specs, bundles), host, port, limits, lambda m: click.echo(m, err=True), store)


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
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
              help="[default: onnxruntime on CPU (openvino for bf16)]")
@click.option("--int8", is_flag=True, help="Use each bundle's int8 ONNX graph.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="fp32 [default], int8 (as --int8), or bf16 on a CPU with bf16 units (the openvino extra).")
@click.option("--task", default=None,
              help="The task to score; every bundle must have it [default: a one-task bundle's only task].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also write a bar chart PNG here.")
def evaluate(bundle_paths, data, split, text_column, text_b_column, label_column, batch_size, backend, int8, precision,
             task, as_json, plot):
    """Accuracy, macro-F1 and throughput of bundles side by side, on the same labelled data."""
    # Everything that can fail is checked before the first bundle is scored (scoring is the long part):
    # the plot's needs, the data, and every bundle loaded and its labels against the data.
    if plot:
        check_plot(Path(plot))
    examples, described = load_eval_examples(data, split, Columns(text_column, label_column, text_b_column))
    loaded = []
    for path in bundle_paths:
        with naming_bundle(path):
            bundle = load(path, "CPU", backend, int8, precision)
            spec = task_to_score(bundle, task)
            check_examples(bundle, examples, spec.name, described)
        loaded.append((path, bundle, spec))
    rows = []
    for path, bundle, spec in loaded:
        with naming_bundle(path):
            metrics = score(bundle, examples, batch_size, spec.name)
        shown = f"{path} [{spec.name}]" if bundle.manifest.several else path
        rows.append({"bundle": shown, "kind": spec.kind_label, **metrics})
    if plot:
        plot_png(rows, described, Path(plot))
    if as_json:
        click.echo(json.dumps({"data": described, "n": len(examples), "results": rows}, indent=2))
    else:
        click.echo(f"{described}: {len(examples)} examples")
        click.echo(table(rows))


def task_to_score(bundle, task):
    """--task, which the bundle must have (a one-task bundle too: another name is a mistake, not to be ignored),
    or a one-task bundle's only task."""
    names = bundle.manifest.task_names
    if task is not None and task not in names:
        raise InputError(f"--task {task!r}: the bundle has no such task (it has {', '.join(names)})")
    return bundle.manifest.task(task)


@contextmanager
def naming_bundle(path):
    """A per-bundle error of a command over several bundles says which bundle (unless it names it already)."""
    try:
        yield
    except PtbundleError as e:
        if str(e).startswith(str(Path(path))):
            raise
        raise type(e)(f"--bundle {path}: {e}") from e


@cli.command()
@click.argument("bundle_path", metavar="BUNDLE", default=DEFAULT_BUNDLE)
def info(bundle_path):
    """Show what a bundle holds: task, labels, backbone, recipe, metrics, files.

    Every file is checked against its sha256 in the manifest: one that
    differs or is missing is marked, and the command exits 1 naming it.
    """
    m = Manifest.read(Path(bundle_path))
    bb = m.backbone
    # Every block starts with its heading and holds only its own lines: the bundle's block (its one task's lines
    # too, for a one-task bundle), then a merged bundle's tasks, each under its own heading.
    click.echo(bundle_heading(bundle_path, m))
    click.echo(f"  backbone    {bb.name} ({bb.model_type}, {bb.layers}x{bb.hidden_size}), sha256 {bb.sha256[:12]}")
    # int8 figures are model.int8.onnx's: a bundle without it has none (a merged one keeps its sources' figures).
    int8 = GRAPHS["onnx-int8"] in m.files
    if not m.several:
        show_task(m.only, int8)
    problems = show_files(bundle_path, m)
    for t in m.tasks if m.several else ():
        click.echo(task_heading(t))
        show_task(t, int8)
    if problems:  # after every task is shown: the marks above say which files
        more = f" (and {len(problems) - 1} more file(s), marked above)" if len(problems) > 1 else ""
        raise BundleError(problems[0] + more)


def show_files(bundle_path, m) -> list:
    """The bundle's own lines (parity, versions, files with their check); the problems of the files that fail it."""
    if m.export:
        click.echo("  parity      " + ", ".join(f"{k} {v:.1e}" for k, v in m.export.items()))
    click.echo(f"  created     {m.created}")
    click.echo("  versions    " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    click.echo("  files")
    width = max([22] + [len(name) for name in m.files])
    problems = []
    for name, digest in m.files.items():
        problem = file_problem(Path(bundle_path), name, digest)
        status = "ok" if problem is None else "MISSING" if not (Path(bundle_path) / name).is_file() else "DIFFERS"
        click.echo(f"    {name:<{width}} sha256 {digest[:16]}  {status}")
        problems += [problem] if problem else []
    return problems


def bundle_heading(bundle_path, m) -> str:
    """The first line: what the bundle is (its one task, or its tasks)."""
    if m.several:
        return f"{bundle_path}: multi-task bundle, {len(m.tasks)} tasks in one graph: {', '.join(m.task_names)}"
    t = m.only
    if t.generation:
        return f"{bundle_path}: generation bundle {t.name} (pt-run generate)"
    head = f" ({t.head} head)" if t.kind == "hard" else ""
    return f"{bundle_path}: {t.kind} prompt bundle{head} for {t.name}"


def task_heading(t) -> str:
    """A merged bundle's task, heading its block."""
    head = f" ({t.head} head)" if t.kind == "hard" else ""
    return f"task {t.name}: {t.kind} prompt{head}"


def show_task(t, int8: bool) -> None:
    """The lines of one task under its heading; `int8`: the bundle holds the int8 graph its int8 figures are of."""
    if t.generation:
        gen = t.generation
        click.echo(f"  prompt      {t.prompt_method}, {t.num_virtual_tokens} positions in the prompt cache;"
                   f" context {gen['max_positions']} positions, eos ids {gen['eos_token_ids']}")
        if MINDIR_CAPACITY in gen:
            click.echo(f"  mindir      a static KV cache of {gen[MINDIR_CAPACITY]} positions (--backend mindspore)")
        if t.template:
            click.echo(f"  template    {t.template!r}")
        return
    click.echo(f"  labels      {', '.join(t.labels)}")
    if t.template:
        click.echo(f"  template    {t.template}")
    click.echo(f"  prompt      {t.prompt_method}, {t.num_virtual_tokens} virtual tokens, {t.pooling} pooling,"
               f" {t.head} head, max length {t.max_length}")
    for label, texts in (t.details.get("verbalizer") or {}).items():
        click.echo(f"  verbalizer  {label}: " + " | ".join(texts))
    if PEFT_DETAIL in t.details:  # bundles since peft/: the adapter's directory, or why there is none
        peft = t.details[PEFT_DETAIL]
        click.echo(f"  peft        {peft}" + ("/ (PeftModel.from_pretrained)" if peft == PEFT_DIR else ""))
    if t.recipe:
        click.echo("  recipe      " + ", ".join(recipe_items(t)))
    metrics = t.metrics
    for split in ("dev", "test"):
        s = metrics.get(split)
        if s:
            click.echo(f"  {split:<11} accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f} (n={s['n']})")
    if "seconds_per_step_median" in metrics:
        click.echo(f"  training    {metrics.get('steps')} steps, {metrics['seconds_per_step_median']} s/step (median),"
                   f" {metrics.get('train_seconds')} s")
    for split, s in (metrics.get("int8") or {}).items() if int8 else ():
        click.echo(f"  int8 {split:<6} accuracy {s['accuracy']:.4f} (fp32 {metrics[split]['accuracy']:.4f})")
    bf16 = metrics.get("bf16") or {}  # model.onnx in bf16 (--precision bf16), measured on the build machine
    for split in ("dev", "test") if "max_abs_logit_diff" in bf16 else ():
        if split in bf16:
            click.echo(f"  bf16 {split:<6} accuracy {bf16[split]['accuracy']:.4f} (fp32"
                       f" {metrics[split]['accuracy']:.4f}), max logit difference {bf16['max_abs_logit_diff'][split]}")


def recipe_items(t) -> list:
    """The recipe as given, 'k=v'; its pooling is the task's own: the recipe records --pooling as given, which a
    family that pools its own way (a decoder reads the last token) did not use."""
    items = []
    for k, v in t.recipe.items():
        if k == "pooling" and v != t.pooling:
            items.append(f"pooling={t.pooling} (--pooling {v} not used)")
        elif v is not None:
            items.append(f"{k}={v}")
    return items


def load(path, device, backend, int8, precision=None):
    return Bundle.load(path, device=device, backend=backend, precision=precision_of(int8, precision))


def precision_of(int8: bool, precision: str | None) -> str:
    if int8 and precision not in (None, "int8"):
        raise InputError(f"--int8 and --precision {precision}: give one")
    return precision or ("int8" if int8 else "fp32")


def main():
    cli()
