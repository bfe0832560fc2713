"""Tasks as data at scale: one merged bundle of 1 to 1,000 tasks against the one-task bundle it grew from.

    .venv/bin/python bench/perf/multitask_scale.py [--bundle exports/mr-soft] [--data mr] \
        [--counts 1,2,10,100,1000] [--batch-sizes 1,16,64] [--repeats 3] [--every 4] [--workdir DIR]

The tasks: the bundle's own PEFT adapter (its peft/ directory) is task
t0000; t0001, t0002, ... are copies of it whose tensors (the prompt table
and the head) are multiplied by (1 + 0.01 * noise), noise standard normal
from one seeded generator; every other file of the adapter is copied as it
is (ptbundle_calibration.json too, when the bundle has one: every copy then
claims the original's int8 ranges, which the merge joins).  For each N of
--counts, N = 1 is the bundle itself (the baseline) and N >= 2 the merge of
t0000..t{N-1} by `pt-build merge` (merge of ptbundle.builder, in this process),
asked for an int8 graph too; if that raises, the merge is run again without
it and int8 is recorded as skipped with the error's first line.  Then:

- merge wall time, the bundle's size on disk (every file), and the bytes of
  one task's table entries (the adapter's tensors: prompt and head), so the
  size reads against backbone + N x task bytes (the backbone taken as the
  one-task model.onnx less one task);
- throughput: sentences/s of `Bundle.logits` (batched, sorted by length, as
  the runtime does) over --data's test sentences (dev if none; every K-th),
  fp32 and int8 where the bundle has model.int8.onnx, at each batch size;
  the rows of a merged bundle go to its N tasks uniformly at random (seeded:
  "mixed" batches); median and min-max of --repeats passes after a warm-up
  of two batches, each merged pass paired with a pass of the one-task bundle
  in the same window (one-task, merged, one-task, merged, ...): ratio =
  merged median / one-task median of those passes, per (N, precision, batch
  size), so that a machine that drifts moves both alike.  The largest N runs
  the same way against N = 2 too ("against_2": does the cost per row grow
  with the tasks the tables hold?), when both are in --counts.  The one-task
  bundle also runs alone first and again at the end (baseline_end: how far
  the machine drifted over the run);
- load: a new process per bundle and precision times `Bundle.load` (files
  hashed, as pt-run does) and reports its peak RSS after one small predict
  (VmHWM: ru_maxrss would start at this process's, which it inherits);
- correctness: up to 8 tasks of each merged bundle (t0000, t0001, the last,
  evenly spaced others), their rows in one mixed call, against a one-task
  reference: t0000's is the bundle itself, and two perturbed adapters (t0001
  and the last of the largest N) are folded by `pt-build import`
  (import_adapter of ptbundle.builder) as theirs; max |logit difference| <= 1e-4.
  Every sampled task is also compared with its rows run alone (batch
  composition), and int8's rows with fp32's;
- --add: at the largest N (when >= 100, or with --smoke) one more perturbed
  adapter joins the merged bundle (`pt-build merge --add`), timed; the old
  tasks' logits on a few texts must be the same to the bit before and after.

Exits 1 (after writing the results) when a check fails.  Everything is
written under --workdir (kept; default: a temporary directory, removed);
each merged bundle is deleted once measured unless --workdir is given.
Writes <results>/multitask_scale.json.
"""

from __future__ import annotations

import json
import resource
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

SEED = 0
NOISE = 0.01  # each perturbed tensor is x * (1 + NOISE * standard normal)
TOLERANCE = 1e-4  # builder/pipelines/merge.py's SOURCE_TOLERANCE: what the merge itself promises
SAMPLE = 8  # tasks of each merged bundle checked
IMPORTED = 2  # perturbed adapters folded by pt-build import as one-task references
ADD_AT_LEAST = 100  # --add runs at the largest N when it is at least this (any N with --smoke)
INT8_GRAPH = "model.int8.onnx"  # runtime.format.GRAPHS["onnx-int8"]
FP32_GRAPH = "model.onnx"
SIZE_BOUND = 1.05  # issue 25: a bundle of N tasks at most 1.05 x (backbone + N x one task's bytes)
SMOKE = {"counts": "1,2,5", "batch_sizes": "1,4", "repeats": 1, "every": 1, "sentences": 16, "check": 8}
CHECK_TEXTS = 16  # texts each sampled task runs in the correctness check
ADD_TEXTS = 8  # texts the --add check runs each old task on
log = common.log


# --- the tasks -----------------------------------------------------------------------------

def task_name(i: int) -> str:
    return f"t{i:04d}"


def tensor_files(adapter: Path) -> list:
    return sorted(adapter.glob("*.safetensors"))  # adapter_model.safetensors (prompt, SEQ_CLS head), head.safetensors


def task_tensors(adapter: Path) -> dict:
    """name -> shape of every tensor of the adapter, and their bytes in all: one task's table entries."""
    from safetensors.numpy import load_file

    shapes, nbytes = {}, 0
    for f in tensor_files(adapter):
        for key, value in load_file(str(f)).items():
            shapes[f"{f.name}:{key}"] = list(value.shape)
            nbytes += value.nbytes
    return {"tensors": shapes, "bytes": nbytes}


def perturbed_adapters(source: Path, out: Path, n: int) -> list:
    """t0001..t{n} under `out`: `source`'s tensors times (1 + NOISE * noise), its other files copied."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(SEED)
    originals = {f.name: load_file(str(f)) for f in tensor_files(source)}
    paths = []
    for i in range(1, n + 1):
        d = out / task_name(i)
        d.mkdir(parents=True, exist_ok=True)
        for f in sorted(source.iterdir()):
            if f.name in originals:
                tensors = {k: np.ascontiguousarray(v * (1 + NOISE * rng.standard_normal(v.shape)).astype(v.dtype))
                           for k, v in originals[f.name].items()}
                save_file(tensors, str(d / f.name), metadata={"format": "pt"})  # as PEFT writes them
            elif f.is_file():
                shutil.copy2(f, d / f.name)
        paths.append(d)
    return paths


# --- building -------------------------------------------------------------------------------

def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def merge_log(message: str) -> None:
    log(f"merge: {message}")


def merge_timed(specs: list, destination: Path, backbone, max_length: int, quantize: bool, add: bool = False) -> list:
    """Run the merge, asking for int8 first when `quantize`; every attempt as {quantize, seconds[, error]}.
    A failure without int8 raises."""
    attempts = []
    for q in ([True, False] if quantize else [False]):
        started = time.perf_counter()
        try:
            # quantize only when asked: a merge that predates the option then fails (TypeError) and is retried
            common.merge(specs, destination, backbone, "CPU", merge_log, add=add, max_length=max_length,
                         **({"quantize": True} if q else {}))
        except Exception as e:  # noqa: BLE001 - any failure of the int8 attempt is recorded, then retried without
            attempts.append({"quantize": q, "seconds": round(time.perf_counter() - started, 2), "error": first_line(e)})
            if not q:
                raise
            log(f"merge with int8 failed ({first_line(e)}); again without")
            if not add and destination.exists():  # (merge writes atomically; a partial bundle is not expected)
                shutil.rmtree(destination)
            continue
        attempts.append({"quantize": q, "seconds": round(time.perf_counter() - started, 2)})
        break
    return attempts


def has_int8(bundle: Path) -> bool:
    return INT8_GRAPH in common.Manifest.read(bundle).files


def int8_status(bundle: Path, attempts: list) -> dict:
    if has_int8(bundle):
        return {"measured": True, "skipped": None}
    failed = next((a["error"] for a in attempts if a["quantize"] and "error" in a), None)
    if failed:
        return {"measured": False, "skipped": f"merge with int8 failed: {failed}"}
    return {"measured": False, "skipped": f"the bundle has no {INT8_GRAPH}"}


def sizes(bundle: Path) -> dict:
    """Bytes of every file, in all and by top-level entry (a directory summed)."""
    entries = {}
    for f in bundle.rglob("*"):
        if f.is_file():
            top = f.relative_to(bundle).parts[0]
            entries[top] = entries.get(top, 0) + f.stat().st_size
    return {"total": sum(entries.values()), "files": dict(sorted(entries.items()))}


def size_row(n: int, own: dict, single: dict, task_bytes: int) -> dict:
    """The bundle's size against the bound: backbone + N x one task's bytes, within SIZE_BOUND; the backbone is
    the one-task bundle less its task (every graph, the tokenizer and the rest a bundle of any N carries)."""
    mb = 2 ** 20
    expected = single["total"] - task_bytes + n * task_bytes
    row = {"total_mb": round(own["total"] / mb, 3), "files_mb": {k: round(v / mb, 3) for k, v in own["files"].items()},
           "model_onnx_mb": round(own["files"].get(FP32_GRAPH, 0) / mb, 3),
           "expected_total_mb": round(expected / mb, 3), "total_over_expected": round(own["total"] / expected, 4),
           "within_bound": own["total"] <= SIZE_BOUND * expected}
    if n > 1:  # what each task beyond the first adds, in task-table copies (graphs, prompt.safetensors...)
        extra = (own["total"] - single["total"]) / (n - 1)
        row.update(marginal_bytes_per_task=round(extra), marginal_task_copies=round(extra / task_bytes, 2))
    return row


# --- measuring --------------------------------------------------------------------------------

def throughput(bundle, texts: list, tasks, batch_size: int, repeats: int) -> list:
    """Seconds per pass of `logits` over the texts, `repeats` passes after a two-batch warm-up."""
    warm = slice(0, 2 * batch_size)
    bundle.logits(texts[warm], task=tasks[warm] if isinstance(tasks, list) else tasks, batch_size=batch_size)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        bundle.logits(texts, task=tasks, batch_size=batch_size)
        seconds.append(time.perf_counter() - started)
    return seconds


def mixed_tasks(names: list, count: int) -> list:
    """A task for each of `count` rows, uniform over `names`, the same in every run for the same N."""
    picks = np.random.default_rng([SEED, len(names)]).integers(len(names), size=count)
    return [names[i] for i in picks]


def throughput_rows(path: Path, precisions: list, texts: list, tasks, sizes_: list, repeats: int,
                    label: str) -> list:
    rows = []
    for precision in precisions:
        bundle = common.open_bundle(path, int8=precision == "int8")
        for size in sizes_:
            seconds = throughput(bundle, texts, tasks, size, repeats)
            rate = common.spread([len(texts) / s for s in seconds], 2)
            rows.append({"precision": precision, "batch_size": size, "sentences": len(texts),
                         "sentences_per_second": rate})
            log(f"{label} {precision} batch {size}: {rate['median']:.1f} sentences/s")
        del bundle
    return rows


def paired_rows(path: Path, source: Path, precisions: list, texts: list, tasks, sizes_: list, repeats: int,
                label: str, base_tasks=None, base_label: str = "one task") -> list:
    """throughput_rows of the merged bundle with the one-task bundle (or another merged one, its rows going to
    `base_tasks`) timed in the same window, pass for pass (base, merged, base, ...): ratio = merged median / base
    median of those passes, so that other work on the machine, or its clock, moves both alike."""
    rows = []
    for precision in precisions:
        merged = common.open_bundle(path, int8=precision == "int8")
        single = common.open_bundle(source, int8=precision == "int8")
        for size in sizes_:
            pairs = [(throughput(single, texts, base_tasks, size, 1)[0], throughput(merged, texts, tasks, size, 1)[0])
                     for _ in range(repeats)]
            rate = common.spread([len(texts) / m for _, m in pairs], 2)
            base = common.spread([len(texts) / b for b, _ in pairs], 2)
            rows.append({"precision": precision, "batch_size": size, "sentences": len(texts),
                         "sentences_per_second": rate, "base_same_window": base,
                         "ratio": round(rate["median"] / base["median"], 3)})
            log(f"{label} {precision} batch {size}: {rate['median']:.1f} sentences/s, {base_label}"
                f" {base['median']:.1f} in the same passes ({rows[-1]['ratio']:.3f})")
        del merged, single
    return rows


def with_ratios(rows: list, single: list) -> list:
    base = {(r["precision"], r["batch_size"]): r["sentences_per_second"]["median"] for r in single}
    for r in rows:
        b = base.get((r["precision"], r["batch_size"]))
        r["ratio"] = round(r["sentences_per_second"]["median"] / b, 3) if b else None
    return rows


def load_probe(argv: list) -> None:
    """In a new process (see load_row): import, Bundle.load, one small predict; print figures as JSON."""
    path, precision, texts, tasks = argv[0], argv[1], json.loads(argv[2]), json.loads(argv[3])

    def rss_mb():
        """Peak RSS of this process: VmHWM, the high-water mark of its own address space.  Not ru_maxrss, which
        Linux carries over fork and exec: a child of this script (MindSpore imported, GBs) would report ours."""
        status = Path("/proc/self/status")
        kb = next((int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")),
                  None) if status.is_file() else None
        return round((kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024, 1)  # both in KB

    started = time.perf_counter()
    open_bundle = common.open_bundle  # imports the runtime
    imported = time.perf_counter()
    rss_imported = rss_mb()
    bundle = open_bundle(path, int8=precision == "int8")
    loaded = time.perf_counter()
    bundle.predict(texts, task=tasks)
    print(json.dumps({"import_seconds": round(imported - started, 3), "load_seconds": round(loaded - imported, 3),
                      "predict_seconds": round(time.perf_counter() - loaded, 3), "rss_after_import_mb": rss_imported,
                      "peak_rss_mb": rss_mb()}))


def load_row(path: Path, precision: str, texts: list, tasks) -> dict:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import multitask_scale; "
            "multitask_scale.load_probe(sys.argv[2:])")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(path), precision,
                           json.dumps(texts), json.dumps(tasks)], capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"loading {path} ({precision}) in a new process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sample_tasks(n: int) -> list:
    """Indices of the tasks checked: t0000, t0001, the last, and evenly spaced others, up to SAMPLE."""
    chosen = {0, 1, n - 1}
    for i in np.linspace(0, n - 1, SAMPLE):
        if len(chosen) < SAMPLE:
            chosen.add(int(round(i)))
    return sorted(chosen)


def correctness(path: Path, n: int, texts: list, references: dict, int8: bool) -> dict:
    """The sampled tasks' rows in one mixed call against their references (name -> logits of `texts`)."""
    sample = sample_tasks(n)
    rows = [(i, k) for i in sample for k in range(len(texts))]
    order = np.random.default_rng([SEED, n, 1]).permutation(len(rows))
    rows = [rows[j] for j in order]
    mixed_texts, mixed_names = [texts[k] for _, k in rows], [task_name(i) for i, _ in rows]
    bundle = common.open_bundle(path)
    got = bundle.logits(mixed_texts, task=mixed_names, batch_size=len(texts))
    tasks, worst = [], 0.0
    for i in sample:
        name = task_name(i)
        mine = np.empty((len(texts), got.shape[1]), got.dtype)
        for j, (t, k) in enumerate(rows):
            if t == i:
                mine[k] = got[j]
        alone = bundle.logits(texts, task=name, batch_size=len(texts))
        row = {"task": name, "reference": None, "max_abs_diff": None,
               "mixed_vs_alone_max_abs_diff": float(np.abs(mine - alone).max())}
        if name in references:
            kind, want = references[name]
            diff = float(np.abs(mine[:, : want.shape[1]] - want).max())
            row.update(reference=kind, max_abs_diff=diff)
            worst = max(worst, diff)
        tasks.append(row)
    result = {"texts": len(texts), "tasks": tasks, "max_abs_diff": worst,
              "checked_against_reference": sum(r["reference"] is not None for r in tasks),
              "max_mixed_vs_alone": max(r["mixed_vs_alone_max_abs_diff"] for r in tasks), "tolerance": TOLERANCE}
    result["ok"] = bool(worst <= TOLERANCE and result["max_mixed_vs_alone"] <= TOLERANCE
                        and result["checked_against_reference"] > 0)
    del bundle
    if int8:  # int8 against fp32 on the same mixed rows: the merged int8 graph's error, not a check
        quantized = common.open_bundle(path, int8=True).logits(mixed_texts, task=mixed_names, batch_size=len(texts))
        result["int8_vs_fp32_max_abs_diff"] = float(np.abs(quantized - got).max())
    manifest = common.Manifest.read(path)
    export = manifest.export if isinstance(manifest.export, dict) else {}
    parity = export.get("parity", export)
    result["merge_own_check"] = {k: parity.get(k) for k in ("sources", "sources_checked")}
    return result


def old_logits(path: Path, texts: list, names: list, int8: bool) -> dict:
    tasks = [names[k % len(names)] for k in range(len(texts))]
    out = {"fp32": common.open_bundle(path).logits(texts, task=tasks, batch_size=len(texts))}
    if int8:
        out["int8"] = common.open_bundle(path, int8=True).logits(texts, task=tasks, batch_size=len(texts))
    return out


def add_one(merged: Path, adapter: Path, n: int, texts: list, backbone, max_length: int) -> dict:
    """Time `merge --add` of one adapter into the N-task bundle; the old tasks' logits before and after."""
    old = [task_name(i) for i in sorted({0, 1, n - 1})]
    int8 = has_int8(merged)
    before = old_logits(merged, texts, old, int8)
    size_before = sizes(merged)["total"]
    attempts = merge_timed([str(merged), f"{task_name(n)}={adapter}"], merged, backbone, max_length, int8, add=True)
    manifest = common.Manifest.read(merged)
    after = old_logits(merged, texts, old, int8 and has_int8(merged))
    row = {"tasks_before": n, "tasks_after": len(manifest.tasks), "seconds": attempts[-1]["seconds"],
           "attempts": attempts, "old_tasks_checked": old, "texts": len(texts),
           "size_mb_before": round(size_before / 2 ** 20, 3),
           "size_mb_after": round(sizes(merged)["total"] / 2 ** 20, 3),
           "bit_identical": bool(np.array_equal(before["fp32"], after["fp32"])),
           "max_abs_diff": float(np.abs(before["fp32"] - after["fp32"]).max())}
    if "int8" in before:
        row["int8_bit_identical"] = bool(np.array_equal(before["int8"], after["int8"])) if "int8" in after else None
    row["ok"] = row["bit_identical"] and row["tasks_after"] == n + 1
    return row


# --- the report ---------------------------------------------------------------------------------

def fmt_rate(r: dict) -> str:
    s = r["sentences_per_second"]
    return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"


def print_tables(rows: list, add: dict | None, task_bytes: int) -> None:
    click.echo(f"\n{'N':>5} {'merge s':>8} {'int8':>5} {'size MB':>9} {'bound MB':>9} {'ratio':>7} {'copies':>7}"
               f" {'load s':>7} {'RSS MB':>7} {'int8 RSS':>9} {'max|diff|':>10}")
    for r in rows:
        fp32, int8, s = r["load"]["fp32"], r["load"].get("int8") or {}, r["size"]
        c = r.get("correctness")
        click.echo(f"{r['tasks']:>5} {r['merge']['seconds'] if r['merge'] else '-':>8} "
                   f"{'yes' if r['int8']['measured'] else 'no':>5} {s['total_mb']:>9.2f} "
                   f"{SIZE_BOUND * s['expected_total_mb']:>9.2f} {s['total_over_expected']:>7.3f}"
                   f" {s.get('marginal_task_copies', '-'):>7} "
                   f"{fp32['load_seconds']:>7.2f} {fp32['peak_rss_mb']:>7.0f} {int8.get('peak_rss_mb', '-'):>9} "
                   + (f"{c['max_abs_diff']:>10.2e}" if c else f"{'-':>10}"))
    click.echo(f"(one task's table entries: {task_bytes / 1024:.1f} KiB; bound = {SIZE_BOUND} x (backbone + N x task),"
               f" the backbone being the one-task bundle less its task; ratio = size / (backbone + N x task);"
               f" copies = bytes each task beyond the first adds / task bytes)")
    click.echo(f"\n{'N':>5} {'prec':>5} {'batch':>6} {'sentences/s [min-max]':>26} {'one task, same passes':>26}"
               f" {'ratio':>7}")
    for r in rows:
        for t in r["throughput"]:
            ratio = f"{t['ratio']:.3f}" if t.get("ratio") is not None else "-"
            same = fmt_rate({"sentences_per_second": t["base_same_window"]}) if "base_same_window" in t else "-"
            click.echo(f"{r['tasks']:>5} {t['precision']:>5} {t['batch_size']:>6} {fmt_rate(t):>26} {same:>26}"
                       f" {ratio:>7}")
    for r in rows:
        if "against_2" in r:
            click.echo(f"\n{'N':>5} {'prec':>5} {'batch':>6} {'sentences/s [min-max]':>26} {'N=2, same passes':>26}"
                       f" {'ratio':>7}")
            for t in r["against_2"]:
                same = fmt_rate({"sentences_per_second": t["base_same_window"]})
                click.echo(f"{r['tasks']:>5} {t['precision']:>5} {t['batch_size']:>6} {fmt_rate(t):>26} {same:>26}"
                           f" {t['ratio']:>7.3f}")
    for r in rows:
        if r["int8"]["skipped"] and r["tasks"] > 1:
            click.echo(f"N={r['tasks']}: int8 skipped: {r['int8']['skipped']}")
    if add:
        click.echo(f"\n--add 1 task to N={add['tasks_before']}: {add['seconds']:.1f} s; old tasks' logits"
                   f" {'bit-identical' if add['bit_identical'] else 'CHANGED (max %.2e)' % add['max_abs_diff']}")


@click.command()
@common.options(backbone_help="The bundle's backbone checkpoint, which merge and import read [default: the shipped"
                              " all-MiniLM-L6-v2].")
@click.option("--bundle", "bundle_path", default="exports/mr-soft", show_default=True,
              help="A one-task soft-prompt bundle with a PEFT adapter (peft/): task t0000 and the baseline.")
@click.option("--counts", default="1,2,10,100,1000", show_default=True, help="Tasks per merged bundle (1: the bundle).")
@click.option("--batch-sizes", default="1,16,64", show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Timed passes per throughput row.")
@click.option("--every", default=4, show_default=True, help="Throughput runs on every K-th test sentence.")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="Adapters and merged bundles go here and are kept [default: a temporary directory, removed].")
def main(backbone, data, smoke, results, bundle_path, counts, batch_sizes, repeats, every, workdir):
    if smoke:
        counts, batch_sizes, repeats, every = SMOKE["counts"], SMOKE["batch_sizes"], SMOKE["repeats"], SMOKE["every"]
    counts = sorted({1, *(int(x) for x in counts.split(",") if x.strip())})  # N = 1, the baseline, always
    sizes_ = [int(x) for x in batch_sizes.split(",") if x.strip()]
    source = Path(bundle_path).resolve()
    manifest = common.read_manifest(source)
    common.check_backbone(manifest, backbone)
    adapter = source / "peft"
    if not (adapter / "adapter_config.json").is_file():
        why = (manifest.get("details") or {}).get("peft")
        raise click.ClickException(f"{bundle_path}: no PEFT adapter (peft/){f': {why}' if why else ''}; the tasks"
                                   f" are copies of it")
    if manifest["pair"]:
        raise click.ClickException(f"{bundle_path}: a sentence-pair task; adapters merge as one-text tasks")
    max_length = manifest["max_length"]
    split, examples = common.eval_split(common.load_data(data))
    texts = [e.text for e in examples]
    if smoke:
        texts = texts[: SMOKE["sentences"]]
    total = len(texts)
    texts = common.every_kth(texts, every)
    check_texts = texts[: SMOKE["check"] if smoke else CHECK_TEXTS]
    largest = max(counts)
    add_at = largest if largest >= 2 and (smoke or largest >= ADD_AT_LEAST) else None
    task = task_tensors(adapter)
    single_int8 = INT8_GRAPH in manifest["files"]
    click.echo(f"{bundle_path}: {manifest['prompt_method']} ({manifest['num_virtual_tokens']} virtual tokens);"
               f" one task's tensors {task['bytes'] / 1024:.1f} KiB; {len(texts)} {data} {split} sentences"
               f" ({common.subset_name(total, every)}); {common.cpu_threads()} threads")

    machine = common.machine_info()  # before the run: the load average then is other people's work
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="multitask-scale-")) if own_dir else Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        adapters = [adapter] + perturbed_adapters(adapter, work / "adapters", largest - 1 + (add_at is not None))
        log(f"{len(adapters) - 1} perturbed adapters in {time.perf_counter() - started:.1f} s")

        # references: t0000's is the bundle itself, IMPORTED perturbed ones are folded by pt-build import
        refs = {task_name(0): ("source bundle", common.open_bundle(source).logits(check_texts,
                                                                                  batch_size=len(check_texts)))}
        imports = []
        for i in sorted({1, largest - 1})[:IMPORTED] if largest >= 2 else []:
            out = work / "imported" / task_name(i)
            started = time.perf_counter()
            common.import_adapter(adapters[i], out, backbone, None, None, False, max_length, "CPU",
                                  lambda m: log(f"import: {m}"))
            imports.append({"task": task_name(i), "seconds": round(time.perf_counter() - started, 2)})
            refs[task_name(i)] = ("imported adapter", common.open_bundle(out).logits(check_texts,
                                                                                       batch_size=len(check_texts)))

        single_sizes = sizes(source)
        single_precisions = ["fp32"] + (["int8"] if single_int8 else [])
        probe_texts = texts[:8]
        rows, add, failed = [], None, []
        single_rates = []
        two = None  # the 2-task bundle (path, row tasks, precisions), kept until the largest N runs against it
        for n in counts:
            names = [task_name(i) for i in range(n)]
            if n == 1:
                path, attempts, merge = source, [], None
                int8 = {"measured": single_int8, "skipped": None if single_int8 else f"the bundle has no {INT8_GRAPH}"}
                tasks, probe_tasks = None, None
            else:
                path = work / f"merged-{n}"
                specs = [f"{name}={a}" for name, a in zip(names, adapters)]
                log(f"N={n}: merging")
                attempts = merge_timed(specs, path, backbone, max_length, quantize=True)
                merge = {"seconds": attempts[-1]["seconds"], "attempts": attempts}
                int8 = int8_status(path, attempts)
                tasks = mixed_tasks(names, len(texts))
                probe_tasks = [names[k % n] for k in range(len(probe_texts))]
            precisions = ["fp32"] + (["int8"] if int8["measured"] else [])
            if n == 1:
                rates = throughput_rows(path, precisions, texts, tasks, sizes_, repeats, "N=1")
                rates = single_rates = with_ratios(rates, rates)
            else:
                rates = paired_rows(path, source, precisions, texts, tasks, sizes_, repeats, f"N={n}")
            if n == 2:
                two = (path, tasks, precisions)
            row = {"tasks": n, "bundle": "source" if n == 1 else "merged", "merge": merge, "int8": int8,
                   "size": size_row(n, sizes(path), single_sizes, task["bytes"]),
                   "throughput": rates,
                   "load": {p: load_row(path, p, probe_texts, probe_tasks) for p in precisions}}
            if n == largest and n > 2 and two is not None:  # the issue's "N tasks within 5% of 2", pass for pass
                row["against_2"] = paired_rows(path, two[0], [p for p in precisions if p in two[2]], texts, tasks,
                                               sizes_, repeats, f"N={n}", two[1], "N=2")
            if n > 1:
                row["correctness"] = c = correctness(path, n, check_texts, refs, int8["measured"])
                log(f"N={n}: max |diff| {c['max_abs_diff']:.2e} against {c['checked_against_reference']} reference(s)")
                if not c["ok"]:
                    failed.append(f"N={n} correctness")
            if n == add_at:
                log(f"N={n}: --add {task_name(n)}")
                add = add_one(path, adapters[n], n, texts[:ADD_TEXTS], backbone, max_length)
                if not add["ok"]:
                    failed.append("--add")
            rows.append(row)
            if path != source and own_dir and not (n == 2 and largest > 2):
                shutil.rmtree(path)  # a 1,000-task bundle is GBs; with --workdir it is kept
        if two is not None and own_dir and two[0].exists():
            shutil.rmtree(two[0])
        end_rates = with_ratios(throughput_rows(source, single_precisions, texts, None, sizes_, repeats,
                                                "N=1 (again)"), single_rates)
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)

    print_tables(rows, add, task["bytes"])
    drift = [r["ratio"] for r in end_rates if r["ratio"]]
    if drift:
        click.echo(f"one-task bundle again at the end: {min(drift):.3f}-{max(drift):.3f} x its first figures"
                   f" (machine drift)")
    import onnxruntime

    common.write_results(results, "multitask_scale", {
        "bundle": bundle_path, "data": data, "split": split, "sentences": len(texts),
        "subset": common.subset_name(total, every), "counts": counts, "batch_sizes": sizes_, "repeats": repeats,
        "smoke": smoke, "seed": SEED, "noise": NOISE, "tolerance": TOLERANCE,
        "prompt": {"method": manifest["prompt_method"], "virtual_tokens": manifest["num_virtual_tokens"]},
        "task_bytes": task["bytes"], "task_tensors": task["tensors"], "imported_references": imports,
        "rows": rows, "add": add if add else {"skipped": f"no N >= {ADD_AT_LEAST} in --counts"},
        "baseline_end": end_rates, "failed": failed,
        "threads": {"onnxruntime_intra_op": common.cpu_threads()}, "machine": machine,
        "versions": {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__}})
    if failed:
        raise click.ClickException(f"checks failed: {', '.join(failed)} (figures written)")


if __name__ == "__main__":
    main()
