"""The three `make bundle` bundles merged into one: each task against its own bundle, and what fp16 tables would cost.

    make bundle   # exports/mr-soft, exports/mr-hard-zeroshot, exports/mr-hard-probe (built with --quantize int8)
    .venv/bin/python bench/experiments/merge_check.py [--exports exports] [--name mr] [--data mr] \
        [--batch-size 64] [--workdir DIR] [--backbone DIR]

`pt-build merge soft=<exports>/<name>-soft zeroshot=<name>-hard-zeroshot
probe=<name>-hard-probe --quantize int8` (this venv's pt-build, a process of
its own; --backbone passed on when given) writes the merged bundle (fp32 and
int8 graphs) into --workdir (default: a temporary directory, removed), timed.
Then, on every sentence of --data's test split (dev when it has none; MR:
all 1,068 test sentences):

- parity: each row is given a task at random (RandomState(0)) and the rows
  are shuffled, so every batch of the merged bundle mixes the three tasks;
  its fp32 logits against each task's own bundle's on the same sentences:
  max |logit difference| per task, and the same with the task's rows run
  alone through the merged bundle.  Claim: <= 1e-4 (what merge promises).
  The int8 graphs' difference (merged int8 against own int8, mixed rows)
  is reported beside it, no claim;
- accuracy on every sentence, per task: merged fp32 against own fp32
  (claim: equal, the same sentences right), merged int8 against own fp32
  (claim: loses at most 0.5 pt; reported, never a reason to exit 1) and
  against own int8;
- the CLI: `pt-run predict - --bundle MERGED --task NAME --format jsonl` on
  the first 200 sentences against `Bundle.predict` of the own bundle: the
  same texts in order, the same labels, every probability within 1e-4
  (a parity claim too);
- task-table precision: the merged model.onnx with every `task.*` float
  initializer (the prompt and head tables) rounded to fp16, and to bf16
  (round to nearest even), loaded in place of the merged bundle's graph;
  the soft task's logits on every sentence against the fp32 tables': max
  |logit difference|, accuracy and predictions changed.  (Measured by hand
  on the 2-core dev machine: fp16 9.1e-4, bf16 6.5e-3, no prediction
  changed: both above the 1e-4 parity bound, so the tables stay fp32.)

Prints a table; writes <results>/merge_check.json; exits 1 (after writing
it) when a parity or equal-accuracy claim fails.  --smoke: every K-th of
the split (24 sentences), batches of 8, 8 sentences through pt-run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

# task name in the merged bundle -> the suffix pt-build export gives that bundle (<name>-<suffix>)
SOURCES = {"soft": "soft", "zeroshot": "hard-zeroshot", "probe": "hard-probe"}
PRECISION_TASK = "soft"  # the task whose logits the fp16/bf16 tables are measured on
SEED = 0
TOLERANCE = 1e-4  # builder/pipelines/merge.py's SOURCE_TOLERANCE: what the merge itself promises
INT8_POINTS = 0.5  # the claim: merged int8 loses at most this many points against the task's own fp32 bundle
CLI_TEXTS = 200  # sentences through pt-run predict per task
SMOKE = {"sentences": 24, "batch_size": 8, "cli_texts": 8}
INT8_GRAPH = "model.int8.onnx"  # runtime.format.GRAPHS["onnx-int8"]
FP32_GRAPH = "model.onnx"
log = common.log


# --- figures ---------------------------------------------------------------------------------

def predicted(logits, labels) -> list:
    return [labels[int(row[: len(labels)].argmax())] for row in logits]


def correct(logits, labels, gold) -> int:
    return sum(p == g for p, g in zip(predicted(logits, labels), gold))


def max_diff(a, b) -> float:
    width = b.shape[1]
    return float(np.abs(a[:, :width] - b).max())


def fp16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest, ties to even) -> float32."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)


ROUNDINGS = {"fp16": fp16, "bf16": bf16}


def rounded_tables(tables: dict, rounding) -> tuple:
    """The merged bundle's float task tables rounded (the graph takes them as inputs); what was rounded."""
    out, names, values, worst = dict(tables), [], 0, 0.0
    for name, a in tables.items():
        if a.dtype == np.float32:
            r = rounding(a).astype(np.float32)
            worst = max(worst, float(np.abs(r - a).max()) if a.size else 0.0)
            out[name] = r
            names.append(name)
            values += a.size
    return out, {"initializers": sorted(names), "values": int(values), "max_abs_rounding": worst}


def cli_check(merged: Path, task: str, own, texts: list) -> dict:
    """pt-run predict --task through the merged bundle against Bundle.predict of the task's own bundle."""
    done = subprocess.run([common.tool("pt-run"), "predict", "-", "--bundle", str(merged), "--task", task,
                           "--format", "jsonl"], input="\n".join(texts) + "\n", capture_output=True, text=True)
    if done.returncode != 0:
        return {"lines": 0, "ok": False, "error": done.stderr.strip()[-500:]}
    got = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    want = own.predict(texts)
    same_texts = len(got) == len(texts) and all(g["text"] == t for g, t in zip(got, texts))
    same_tasks = all(g.get("task") == task for g in got)
    labels_equal = sum(g["label"] == w.label for g, w in zip(got, want))
    prob = max((abs(g["probabilities"][k] - p) for g, w in zip(got, want) for k, p in w.probabilities.items()),
               default=0.0)
    ok = same_texts and same_tasks and labels_equal == len(texts) and prob <= TOLERANCE
    return {"lines": len(got), "texts_in_order": same_texts, "task_field": same_tasks,
            "labels_equal": labels_equal, "max_probability_diff": prob, "ok": ok}


# --- the run ---------------------------------------------------------------------------------

@click.command()
@common.options(backbone_help="The bundles' backbone checkpoint, which pt-build merge checks [default: the shipped"
                              " all-MiniLM-L6-v2].")
@click.option("--exports", default=str(common.ROOT / "exports"), show_default="exports",
              type=click.Path(file_okay=False), help="Directory holding the three bundles make bundle writes.")
@click.option("--name", "bundle_name", default="mr", show_default=True,
              help="Their name as pt-build export gave it: <exports>/<name>-soft, <name>-hard-zeroshot,"
                   " <name>-hard-probe.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1),
              help="Rows per batch, merged and own bundles alike [--smoke: 8].")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="The merged bundle and the rounded graphs go here and are kept [default: a temporary directory,"
                   " removed].")
def main(backbone, data, smoke, results, exports, bundle_name, batch_size, workdir):
    machine = common.machine_info()  # before any work: the load average then is other people's
    exports = Path(exports)
    own_paths = {task: exports / f"{bundle_name}-{suffix}" for task, suffix in SOURCES.items()}
    for task, path in own_paths.items():
        if not (path / "manifest.json").is_file():
            raise click.ClickException(f"{path}: no bundle (make bundle writes {bundle_name}-soft, "
                                       f"{bundle_name}-hard-zeroshot and {bundle_name}-hard-probe into exports/)")
        manifest = common.read_manifest(path)
        common.check_backbone(manifest, backbone)
        if INT8_GRAPH not in manifest["files"]:
            raise click.ClickException(f"{path}: no {INT8_GRAPH}; merge --quantize int8 takes its scales from "
                                       f"sources built with --quantize int8")
        if manifest["pair"]:
            raise click.ClickException(f"{path}: a sentence-pair task; this experiment reads one text per row")

    split, examples = common.eval_split(common.load_data(data))
    total = len(examples)
    every = -(-total // SMOKE["sentences"]) if smoke else 1  # MR's test split lists one label, then the other
    examples = common.every_kth(examples, every)
    texts, gold = [e.text for e in examples], [e.label for e in examples]
    if smoke:
        batch_size = SMOKE["batch_size"]
    cli_texts = texts[: SMOKE["cli_texts"] if smoke else CLI_TEXTS]
    names = list(SOURCES)
    click.echo(f"{len(texts)} {data} {split} sentences ({common.subset_name(total, every)}); batches of {batch_size};"
               f" {common.cpu_threads()} threads")

    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="merge-check-")) if own_dir else Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    merged = work / "merged"
    try:
        if merged.exists():  # a --workdir of an earlier run: merge writes a new bundle
            shutil.rmtree(merged)
        command = [common.tool("pt-build"), "merge", *(f"{t}={p}" for t, p in own_paths.items()),
                   "--quantize", "int8", "--out", str(merged)] + (["--backbone", backbone] if backbone else [])
        click.echo("$ " + " ".join(command))
        started = time.perf_counter()
        subprocess.run(command, check=True)
        merge_seconds = time.perf_counter() - started
        merged_export = common.Manifest.read(merged).export

        # Every row a task at random, the rows shuffled: the merged bundle's batches mix the three tasks.
        rng = np.random.RandomState(SEED)
        assigned = [str(t) for t in rng.choice(names, len(texts))]
        order = rng.permutation(len(texts))
        mixed_texts, mixed_tasks = [texts[i] for i in order], [assigned[i] for i in order]
        rows_of = {t: [k for k, name in enumerate(mixed_tasks) if name == t] for t in names}
        empty = [t for t, rows in rows_of.items() if not rows]
        if empty:
            raise click.ClickException(f"no mixed row drew task {', '.join(empty)}: use more sentences")

        stage = time.perf_counter()
        figures = {t: {"labels": None, "mixed_rows": len(rows_of[t])} for t in names}
        logits = {}  # (side, precision, task) -> logits of `texts`
        for precision in ("fp32", "int8"):
            int8 = precision == "int8"
            multi = common.open_bundle(merged, int8=int8)
            got = multi.logits(mixed_texts, task=mixed_tasks, batch_size=batch_size)
            for t in names:
                own = common.open_bundle(own_paths[t], int8=int8)
                labels = own.labels
                if multi.labels_of(t) != labels:
                    raise click.ClickException(f"task {t}: merged labels {multi.labels_of(t)}, own {labels}")
                figures[t]["labels"] = labels
                logits["own", precision, t] = want = own.logits(texts, batch_size=batch_size)
                logits["merged", precision, t] = alone = multi.logits(texts, task=t, batch_size=batch_size)
                rows = rows_of[t]
                figures[t][f"{precision}_mixed_max_abs_diff"] = max_diff(got[rows], want[order[rows]])
                figures[t][f"{precision}_alone_max_abs_diff"] = max_diff(alone, want)
                for side in ("own", "merged"):
                    right = correct(logits[side, precision, t], labels, gold)
                    figures[t][f"{side}_{precision}"] = {"correct": right, "accuracy": round(right / len(texts), 4)}
                log(f"{t} {precision}: mixed max |diff| {figures[t][f'{precision}_mixed_max_abs_diff']:.1e}")
                del own
            del multi
        for t in names:
            f = figures[t]
            f["int8_merged_minus_own_fp32"] = round(100 * (f["merged_int8"]["correct"] - f["own_fp32"]["correct"])
                                                    / len(texts), 2)  # points
            f["int8_merged_minus_own_int8"] = round(100 * (f["merged_int8"]["correct"] - f["own_int8"]["correct"])
                                                    / len(texts), 2)
        parity_seconds = time.perf_counter() - stage

        stage = time.perf_counter()
        for t in names:
            figures[t]["predict_cli"] = cli_check(merged, t, common.open_bundle(own_paths[t]), cli_texts)
        cli_seconds = time.perf_counter() - stage

        # Task tables rounded to fp16 / bf16: the soft task's logits against the fp32 tables'.
        stage = time.perf_counter()
        reference = logits["merged", "fp32", PRECISION_TASK]
        labels = figures[PRECISION_TASK]["labels"]
        base = predicted(reference, labels)
        precision_rows = {"fp32": {"accuracy": round(correct(reference, labels, gold) / len(texts), 4)}}
        tables = common.read_tables(merged / common.PROMPT_FILE)
        for kind, rounding in ROUNDINGS.items():
            tables_rounded, rounded = rounded_tables(tables, rounding)
            bundle = common.open_bundle(merged)
            # the same bundle (tokenizer, templates, graph) fed the rounded tables
            bundle.model = common.OnnxModel(merged / FP32_GRAPH, tables=tables_rounded)
            got = bundle.logits(texts, task=PRECISION_TASK, batch_size=batch_size)
            del bundle
            precision_rows[kind] = {
                "max_abs_diff": max_diff(got, reference), "accuracy": round(correct(got, labels, gold) / len(texts), 4),
                "predictions_changed": sum(a != b for a, b in zip(predicted(got, labels), base)),
                "within_tolerance": max_diff(got, reference) <= TOLERANCE,
                "tables_rounded": len(rounded["initializers"]), "values_rounded": rounded["values"],
                "max_abs_rounding": rounded["max_abs_rounding"]}
        table_precision = {"task": PRECISION_TASK, "tables": rounded["initializers"], "rows": precision_rows,
                           "seconds": round(time.perf_counter() - stage, 1)}
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)

    parity = {t: max(f["fp32_mixed_max_abs_diff"], f["fp32_alone_max_abs_diff"]) for t, f in figures.items()}
    parity_ok = all(v <= TOLERANCE for v in parity.values())
    equal = {t: f["merged_fp32"]["correct"] == f["own_fp32"]["correct"] for t, f in figures.items()}
    cli_ok = {t: f["predict_cli"]["ok"] for t, f in figures.items()}
    int8_values = {t: f["int8_merged_minus_own_fp32"] for t, f in figures.items()}
    int8_ok = all(v >= -INT8_POINTS for v in int8_values.values())

    def claim(text, values, met, exits):
        return {"claim": text, "values": values, "met": met, "verdict": common.verdict(met), "exit_1_if_not": exits}

    claims = [
        claim(f"merged fp32 max |logit diff| per task <= {TOLERANCE:g} (mixed shuffled batches, and alone)",
              parity, parity_ok, True),
        claim(f"merged fp32 {split} accuracy equals own fp32 per task", equal, all(equal.values()), True),
        claim(f"pt-run predict --task: labels equal own Bundle.predict, probabilities within {TOLERANCE:g}",
              cli_ok, all(cli_ok.values()), True),
        claim(f"merged int8 loses at most {INT8_POINTS} pt against own fp32 per task", int8_values, int8_ok, False)]
    failed = [c["claim"] for c in claims if c["exit_1_if_not"] and not c["met"]]

    pct = lambda f, k: f"{100 * f[k]['accuracy']:.2f}"  # noqa: E731
    click.echo(f"\nmerge (--quantize int8): {merge_seconds:.1f} s; {len(texts)} {split} sentences, accuracy in %")
    click.echo(f"{'task':<9} {'rows':>5} {'fp32 |diff|':>11} {'alone':>8} {'int8 |diff|':>11} {'own fp32':>9}"
               f" {'mrg fp32':>9} {'own int8':>9} {'mrg int8':>9} {'int8-fp32':>10} {'pt-run':>8}")
    for t, f in figures.items():
        c = f["predict_cli"]
        click.echo(f"{t:<9} {f['mixed_rows']:>5} {f['fp32_mixed_max_abs_diff']:>11.1e} "
                   f"{f['fp32_alone_max_abs_diff']:>8.1e} {f['int8_mixed_max_abs_diff']:>11.1e} "
                   f"{pct(f, 'own_fp32'):>9} {pct(f, 'merged_fp32'):>9} {pct(f, 'own_int8'):>9} "
                   f"{pct(f, 'merged_int8'):>9} {f['int8_merged_minus_own_fp32']:>+7.2f} pt "
                   f"{'%d/%d' % (c.get('labels_equal', 0), len(cli_texts)) if c['ok'] else 'NO':>8}")
    click.echo(f"\n{PRECISION_TASK} task, tables as  {'max |diff|':>10} {'accuracy':>9} {'changed':>8}")
    for kind, r in precision_rows.items():
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        click.echo(f"{kind:<18} {diff:>10} {100 * r['accuracy']:>9.2f} {r.get('predictions_changed', '-'):>8}")
    click.echo("")
    for c in claims:
        click.echo(f"{c['claim']}: {c['verdict']}")

    import onnx
    import onnxruntime

    common.write_results(results, "merge_check", {
        "smoke": smoke, "data": data, "split": split, "sentences": len(texts),
        "subset": common.subset_name(total, every), "batch_size": batch_size, "seed": SEED,
        "tolerance": TOLERANCE, "int8_points": INT8_POINTS,
        "bundles": {t: str(p) for t, p in own_paths.items()}, "merged": None if own_dir else str(merged),
        "merge_command": command, "merge_seconds": round(merge_seconds, 1), "merged_export": merged_export,
        "tasks": figures, "cli_texts": len(cli_texts), "table_precision": table_precision, "claims": claims,
        "parity_ok": not failed, "failed": failed,
        "seconds": {"parity_and_accuracy": round(parity_seconds, 1), "predict_cli": round(cli_seconds, 1)},
        "threads": {"onnxruntime_intra_op": common.cpu_threads()}, "machine": machine,
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}})
    if failed:
        raise click.ClickException(f"claims failed (figures written): {'; '.join(failed)}")


if __name__ == "__main__":
    main()
