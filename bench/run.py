"""Every benchmark of the project in one run, against its limit and its peer.

    make bench                                   # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --quick        # a few repeats and steps on MR: a few minutes
    .venv/bin/python bench/run.py --peer-full-epochs 1   # + the peer's MR test accuracy (slow)
    .venv/bin/python bench/run.py --smoke --bundle B --backbone DIR --data DIR   # seconds, tiny sizes (tests)

In this order, each in a process of its own (so that one's threads, caches
and GBs of compiled MindSpore graphs do not weigh on the next), one at a time:
1. the limit: fp32 GEMM GFLOP/s at the model's shapes (perf/roofline.py);
2. inference of the bundle: sentences/s at batch 1, 8, 64, sorted-length
   batching on and off, every backend (fp32, int8 if present), and the cold
   start of `pt-run predict` (perf/inference.py);
3. training: seconds per step and projected epoch, default recipe, --data's
   train split (perf/train_step.py);
4. the peer: the same model and recipe in PyTorch + transformers + PEFT on
   the same sentences, batches, padding and thread count (peer/peer_inputs.py
   writes its inputs with our code; peer/peer_torch.py runs in
   bench/.peer-venv, which this script creates on first use; --smoke never
   creates it, and skips the peer, saying so, when it is not there).
Then one table with the issue's targets as ratios, and <results>/all.json
with machine info, library versions, thread counts and every figure
(min/median/max).  The stage outputs stay next to it (roofline.json,
inference.json, train_step.json, peer.json).

The limit is the best layer GEMM rate any library reached in this run
(numpy, MindSpore, onnxruntime, and torch from the peer): for each library,
the FLOPs of a layer's four GEMMs over the sum of their median times at
M = 64 * 48 tokens on MR (perf/roofline.py).  Throughput is shown as useful
GFLOP/s (each sentence at its own length, prompt included) over that limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

import common
from common import ROOT, cpu_threads, machine_info, read_manifest

BENCH = ROOT / "bench"
PEER_VENV = BENCH / ".peer-venv"
TORCH = "torch==2.13.0"  # the CPU wheel in /opt/wheels (pip's global find-links); never the CUDA build
PEER_PACKAGES = [TORCH, "numpy<2", "transformers==5.23.0", "peft==0.21.2", "safetensors==0.8.0",
                 "tokenizers==0.23.3"]

# Budget: the full run fits in 15 minutes on the 2-core machine (batch 8/64 rows run on every 3rd MR
# test sentence, batch 1 on every 8th; the headline rows are rates, which a third of the set measures).
SETTINGS = {
    "full": {"roofline_repeats": 20, "repeats": 3, "cold_repeats": 5, "every": 3, "every_batch1": 8,
             "train_steps": 30, "peer_train_steps": 30},
    "quick": {"roofline_repeats": 3, "repeats": 2, "cold_repeats": 2, "every": 16, "every_batch1": 32,
              "train_steps": 3, "peer_train_steps": 3},
    "smoke": {},  # each stage's own --smoke sizes
}
TARGETS = {"speedup_vs_peer": 1.5, "fraction_of_limit": 0.6, "epoch_vs_peer": 0.7, "cold_start_seconds": 1.0}


def log(message: str) -> None:
    click.echo(f"[bench {time.strftime('%H:%M:%S')}] {message}", err=True)


def run_stage(name: str, cmd: list, stages: dict, env: dict | None = None) -> None:
    """Run one stage in a new process, its output going to ours; record its wall time."""
    log(f"{name}: {' '.join(str(c) for c in cmd)}")
    started = time.perf_counter()
    if subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode != 0:
        raise click.ClickException(f"stage {name} failed (its output is above); nothing summarized")
    stages[name] = round(time.perf_counter() - started, 1)


# --- the peer's environment -------------------------------------------------------------

def peer_ready(venv: Path) -> bool:
    stamp = venv / ".installed"
    return stamp.is_file() and stamp.read_text().strip() == " ".join(PEER_PACKAGES) and (venv / "bin" / "python").exists()


def ensure_peer_venv(venv: Path, stages: dict) -> Path:
    """bench/.peer-venv with torch (CPU) + transformers + peft; created once, checked every time."""
    stamp, spec = venv / ".installed", " ".join(PEER_PACKAGES)
    python = venv / "bin" / "python"
    if not peer_ready(venv):
        started = time.perf_counter()
        log(f"creating {venv} (torch CPU wheel, transformers, peft; a few minutes, once)")
        # sys.executable is the project venv's python: venv builds on its base interpreter (3.11, as the wheel)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-qq", "--disable-pip-version-check"]  # -qq: errors only
        # torch first and alone, so pip takes the local CPU wheel; then the rest with torch pinned
        # again on the same line, so no dependency can upgrade it (to the CUDA build from PyPI).
        subprocess.run(pip + [TORCH], check=True)
        subprocess.run(pip + PEER_PACKAGES, check=True)
        stages["peer_venv_setup"] = round(time.perf_counter() - started, 1)
    check_peer_venv(venv)
    stamp.write_text(spec + "\n")
    return python


def check_peer_venv(venv: Path) -> None:
    python = str(venv / "bin" / "python")
    listing = subprocess.run([python, "-m", "pip", "list", "--disable-pip-version-check"], check=True,
                             capture_output=True, text=True).stdout
    if "nvidia" in listing.lower():
        raise click.ClickException(f"{venv} holds NVIDIA packages (a CUDA torch): delete it and rerun")
    version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    if not version.startswith("2.13.0") or "+cpu" not in version:
        raise click.ClickException(f"{venv}: torch {version}, expected 2.13.0+cpu: delete it and rerun")


def peer_or_skip(venv: Path, smoke: bool, stages: dict) -> Path | None:
    """The peer's python; a --smoke run uses the venv only if it is set up, and never creates it."""
    if not smoke:
        return ensure_peer_venv(venv, stages)
    if peer_ready(venv):
        check_peer_venv(venv)
        return venv / "bin" / "python"
    log(f"peer skipped: no PyTorch environment at {venv} (--smoke never creates it; make bench does)")
    return None


# --- the summary ------------------------------------------------------------------------

def read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def limits(roofline: dict, peer: dict | None) -> dict:
    """Layer GEMM rate of every library measured in this run; the best is the limit."""
    rates = {name: r["layer_gflops"] for name, r in roofline["libraries"].items()}
    if peer and "gemm" in peer:
        rates["torch"] = peer["gemm"]["layer_gflops"]
    best = max(rates, key=rates.get)
    return {"layer_gflops": rates, "limit_gflops": rates[best], "limit_library": best, "tokens": roofline["tokens"]}


def fmt(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def verdict(ok) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def inference_rows(inference: dict, peer: dict | None, limit: float) -> tuple:
    """Table rows and target checks for throughput: each of our rows next to torch at the same batch/order."""
    peer_rows = {(r["batch_size"], r["sorted"]): r for r in (peer or {}).get("inference", [])}
    rows, targets = [], {}
    for config in inference["results"]:
        for t in config["throughput"]:
            gflop = t["useful_gflop_per_sentence"]  # the same sentences on both sides: the same useful FLOPs
            ours = t["sentences_per_second"]
            p = peer_rows.get((t["batch_size"], t["sorted"]))
            theirs = p["sentences_per_second"] if p else None
            ratio = ours["median"] / theirs["median"] if theirs else None
            fraction = ours["median"] * gflop / limit
            # The targets' rows: the bundle's onnxruntime graphs, fp32 and int8, batch 64, sorted.
            headline = config["config"].startswith("onnxruntime") and t["batch_size"] == 64 and t["sorted"]
            target, ok = "", None
            if headline:
                ok = (ratio is not None and ratio >= TARGETS["speedup_vs_peer"]) and fraction >= TARGETS["fraction_of_limit"]
                target = f">={TARGETS['speedup_vs_peer']}x, >={TARGETS['fraction_of_limit']:.0%}"
                targets[f"inference_speedup_vs_peer ({config['config']})"] = {
                    "value": round(ratio, 3) if ratio else None, "target": TARGETS["speedup_vs_peer"],
                    "met": ratio is not None and ratio >= TARGETS["speedup_vs_peer"]}
                targets[f"inference_fraction_of_limit ({config['config']})"] = {
                    "value": round(fraction, 3), "target": TARGETS["fraction_of_limit"],
                    "met": fraction >= TARGETS["fraction_of_limit"]}
            if headline and p and config["config"] == "onnxruntime fp32":
                # Not a speed: both sides predicted the same sentences; equal accuracy says it is the same model.
                targets["same_model_check"] = {"ours_accuracy": t.get("accuracy"), "peer_accuracy": p.get("accuracy"),
                                               "sentences": t["sentences"],
                                               "met": t.get("accuracy") == p.get("accuracy")}
            rows.append({"figure": f"sent/s {config['config']} b{t['batch_size']} {'sorted' if t['sorted'] else 'in order'}"
                                   f" ({t['sentences']})",
                         "ours": fmt(ours), "ours_limit": f"{fraction:.0%}", "peer": fmt(theirs),
                         "peer_limit": f"{theirs['median'] * gflop / limit:.0%}" if theirs else "-",
                         "ratio": f"{ratio:.2f}x" if ratio else "-", "target": target, "met": verdict(ok)})
    return rows, targets


def cold_rows(inference: dict) -> tuple:
    rows, targets = [], {}
    for config in inference["results"]:
        c = config["cold_start_seconds"]
        if c is None:  # not measured (--smoke)
            continue
        target, ok = "", None
        if config["config"] == "onnxruntime fp32":
            ok = c["median"] < TARGETS["cold_start_seconds"]
            target = f"<{TARGETS['cold_start_seconds']:.0f} s"
            targets["cold_start_onnxruntime_seconds"] = {"value": c["median"], "target": TARGETS["cold_start_seconds"],
                                                         "met": ok}
        rows.append({"figure": f"cold start pt-run, 10 lines, {config['config']}, s", "ours": fmt(c, 2),
                     "ours_limit": "", "peer": "-", "peer_limit": "", "ratio": "-", "target": target, "met": verdict(ok)})
    return rows, targets


def training_rows(train: dict, peer: dict | None, manifest: dict) -> tuple:
    theirs = (peer or {}).get("training")
    rows, targets = [], {}

    def ratio(a, b):
        return a / b if a is not None and b else None

    step_ratio = ratio(train["seconds_per_step"]["median"], theirs["seconds_per_step"]["median"]) if theirs else None
    rows.append({"figure": f"train step, batch {train['batch_size']}, s ({train['steps']} steps)",
                 "ours": fmt(train["seconds_per_step"], 3), "ours_limit": "",
                 "peer": fmt(theirs["seconds_per_step"], 3) if theirs else "-", "peer_limit": "",
                 "ratio": f"{step_ratio:.2f}x" if step_ratio else "-", "target": "", "met": "-"})
    epoch_ratio = ratio(train["projected_epoch_seconds"], theirs["projected_epoch_seconds"]) if theirs else None
    ok = None if epoch_ratio is None else epoch_ratio <= TARGETS["epoch_vs_peer"]
    targets["epoch_vs_peer"] = {"value": round(epoch_ratio, 3) if epoch_ratio else None,
                                "target": TARGETS["epoch_vs_peer"], "met": ok}
    rows.append({"figure": f"epoch on {train['data']} train, projected ({train['steps_per_epoch']} steps), s",
                 "ours": fmt(train["projected_epoch_seconds_range"], 0), "ours_limit": "",
                 "peer": fmt(theirs["projected_epoch_seconds_range"], 0) if theirs else "-", "peer_limit": "",
                 "ratio": f"{epoch_ratio:.2f}x" if epoch_ratio else "-",
                 "target": f"<={TARGETS['epoch_vs_peer']}x", "met": verdict(ok)})
    rows.append({"figure": "first step of each padded shape (compile), total s",
                 "ours": f"{sum(train['first_step_per_shape_seconds']):.1f} ({len(train['first_step_per_shape_seconds'])})",
                 "ours_limit": "",
                 "peer": f"{sum(theirs['first_step_per_shape_seconds']):.1f} ({len(theirs['first_step_per_shape_seconds'])})"
                 if theirs else "-", "peer_limit": "", "ratio": "-", "target": "", "met": "-"})
    # Accuracy: ours is the bundle's recorded test accuracy; the peer's needs --peer-full-epochs.
    ours_acc = (manifest.get("metrics") or {}).get("test", {}).get("accuracy")
    peer_acc = theirs.get("test_accuracy") if theirs else None
    ok = None if ours_acc is None or peer_acc is None else ours_acc >= peer_acc
    recipe = manifest.get("recipe") or {}
    targets["accuracy_not_worse"] = {"ours": ours_acc, "peer": peer_acc, "met": ok,
                                     "ours_epochs": recipe.get("epochs"),
                                     "peer_epochs": len(theirs.get("curve", [])) if theirs else None}
    rows.append({"figure": f"test accuracy (ours: bundle, {recipe.get('epochs')} epoch(s))",
                 "ours": f"{ours_acc:.4f}" if ours_acc is not None else "-", "ours_limit": "",
                 "peer": f"{peer_acc:.4f}" if peer_acc is not None else "not run",
                 "peer_limit": "", "ratio": "-", "target": "ours >= peer", "met": verdict(ok)})
    return rows, targets


def same_model_rows(targets: dict) -> list:
    check = targets.get("same_model_check")
    if not check:
        return []
    return [{"figure": f"accuracy on those {check['sentences']} sentences (same model?)",
             "ours": f"{check['ours_accuracy']:.4f}", "ours_limit": "", "peer": f"{check['peer_accuracy']:.4f}",
             "peer_limit": "", "ratio": "-", "target": "equal", "met": verdict(check["met"])}]


def gemm_rows(lim: dict) -> list:
    return [{"figure": f"GEMM fp32 layer rate, {name}, GFLOP/s", "ours": f"{rate:.1f}",
             "ours_limit": "limit" if name == lim["limit_library"] else f"{rate / lim['limit_gflops']:.0%}",
             "peer": "", "peer_limit": "", "ratio": "", "target": "", "met": ""}
            for name, rate in lim["layer_gflops"].items()]


COLUMNS = [("figure", "figure", 52, "<"), ("ours", "ours median [min-max]", 24, "<"), ("ours_limit", "%lim", 6, ">"),
           ("peer", "torch median [min-max]", 24, "<"), ("peer_limit", "%lim", 6, ">"), ("ratio", "ours/peer", 10, ">"),
           ("target", "target", 16, ">"), ("met", "met", 4, ">")]


def render(rows: list) -> str:
    def line(cells):
        return " ".join(f"{str(cells[key]):{align}{width}}" for key, _, width, align in COLUMNS)

    header = line({key: title for key, title, _, _ in COLUMNS})
    return "\n".join([header, "-" * len(header)] + [line(r) for r in rows])


def versions(roofline, inference, peer) -> dict:
    v = {"project": dict(roofline.get("versions", {}))}
    for key in ("onnxruntime_run", "tokenizers_run", "mindspore_run"):
        if key in inference.get("versions", {}):
            v["project"][key.replace("_run", "")] = inference["versions"][key]
    if peer:
        v["peer"] = peer["versions"]
    return v


def recipe_differences(bundle_recipe: dict, peer_data: dict | None) -> list:
    """Recipe fields where the bundle (whose accuracy is ours) was not trained as the peer is."""
    if not peer_data:
        return []
    return sorted(k for k, v in peer_data["recipe"].items() if k != "epochs" and bundle_recipe.get(k) != v)


def summarize(results: Path, bundle_path: str, settings: dict, stages: dict, mode: str, machine: dict) -> dict:
    roofline, inference = read(results / "roofline.json"), read(results / "inference.json")
    train, peer = read(results / "train_step.json"), read(results / "peer.json")
    manifest = read_manifest(bundle_path)
    lim = limits(roofline, peer)
    inf_rows, inf_targets = inference_rows(inference, peer, lim["limit_gflops"])
    cold, cold_targets = cold_rows(inference)
    tr_rows, tr_targets = training_rows(train, peer, manifest)
    tr_targets["accuracy_not_worse"]["bundle_recipe_differs_in"] = recipe_differences(
        manifest.get("recipe") or {}, read(results / "peer-inputs" / "data.json"))
    flops_row = {"figure": f"matmul GFLOP per {inference['data']} {inference['split']} sentence (mean)",
                 "ours": f"{inference['mean_useful_gflop_per_sentence']:.3f}", "ours_limit": "", "peer": "same",
                 "peer_limit": "", "ratio": "", "target": "", "met": ""}
    rows = gemm_rows(lim) + [flops_row] + inf_rows + same_model_rows(inf_targets) + cold + tr_rows
    return {"mode": mode, "bundle": bundle_path, "settings": settings, "machine": machine,
            "versions": versions(roofline, inference, peer),
            "threads": {"usable_cores": cpu_threads(), "inference": inference.get("threads"),
                        "training": train.get("threads"), "peer": (peer or {}).get("threads"),
                        "roofline": roofline.get("threads")},
            "peer_attn_implementation": (peer or {}).get("attn_implementation"),
            "limit": lim, "targets": {**inf_targets, **cold_targets, **tr_targets}, "table": rows,
            "stage_seconds": stages,
            "bundle_training_recorded": {"recipe": manifest.get("recipe"),
                                         "train_seconds": (manifest.get("metrics") or {}).get("train_seconds")},
            "roofline": roofline, "inference": inference, "training": train, "peer": peer}


def sizes(settings: dict, **names) -> list:
    """--option value pairs of a stage from the settings (none in a --smoke run: the stage's own)."""
    return [x for option, key in names.items() if key in settings for x in (f"--{option.replace('_', '-')}", settings[key])]


@click.command()
@common.options(backbone_help="Checkpoint of the bundle, for the limit's shapes, the train step and the peer "
                              "[default: the shipped all-MiniLM-L6-v2].")
@click.option("--bundle", "bundle_path", default="exports/mr-soft", show_default=True)
@click.option("--quick", is_flag=True, help="A few repeats and steps on subsets of the test split: a few minutes.")
@click.option("--no-peer", is_flag=True, help="Skip the PyTorch peer (and its environment).")
@click.option("--peer-venv", default=str(PEER_VENV), show_default="bench/.peer-venv", type=click.Path(file_okay=False),
              help="The peer's environment (created here on first use, except with --smoke).")
@click.option("--peer-full-epochs", default=0, show_default=True,
              help="Train the peer for K real epochs (533 steps each on MR: slow) for its test accuracy.")
def main(backbone, data, smoke, results, bundle_path, quick, no_peer, peer_venv, peer_full_epochs):
    started = time.perf_counter()
    machine = machine_info()  # before any stage: the load average then is other people's work
    bundle = Path(bundle_path) if Path(bundle_path).is_absolute() else ROOT / bundle_path
    if not (bundle / "manifest.json").is_file():
        raise click.ClickException(f"{bundle_path}: no bundle (make bundle builds exports/mr-soft)")
    bundle_path = str(bundle.resolve())
    mode = "smoke" if smoke else "quick" if quick else "full"
    settings = SETTINGS[mode]
    results = Path(results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    for name in ("roofline.json", "inference.json", "train_step.json", "peer.json"):
        (results / name).unlink(missing_ok=True)  # a figure in the summary always comes from this run
    manifest = read_manifest(bundle_path)
    stages = {}
    env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"))  # MindSpore: errors only in the log
    shared = ["--data", data, "--results", results] + (["--backbone", backbone] if backbone else []) \
        + (["--smoke"] if smoke else [])
    python = sys.executable
    peer = None if no_peer else peer_or_skip(Path(peer_venv), smoke, stages)  # first: a failed setup costs nothing

    run_stage("roofline", [python, BENCH / "perf" / "roofline.py", *shared,
                           *sizes(settings, repeats="roofline_repeats")], stages, env)
    run_stage("inference", [python, BENCH / "perf" / "inference.py", *shared, "--bundle", bundle_path,
                            *sizes(settings, repeats="repeats", cold_repeats="cold_repeats", every="every",
                                   every_batch1="every_batch1")], stages, env)
    run_stage("train_step", [python, BENCH / "perf" / "train_step.py", *shared,
                             "--virtual-tokens", manifest["num_virtual_tokens"],
                             *sizes(settings, steps="train_steps")], stages, env)
    if peer:
        inputs = results / "peer-inputs"
        run_stage("peer_inputs", [python, BENCH / "peer" / "peer_inputs.py", *shared, "--bundle", bundle_path,
                                  "--epochs", max(1, peer_full_epochs)], stages, env)
        peer_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        peer_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # The peer's GEMM limit at the shape roofline.py measured ours at, so the two limits compare.
        tokens = json.loads((results / "roofline.json").read_text())["tokens"]
        run_stage("peer", [peer, BENCH / "peer" / "peer_torch.py", "--data", inputs, "--results", results,
                           "--threads", cpu_threads(), "--full-epochs", peer_full_epochs, "--gemm-tokens", tokens,
                           *(["--smoke"] if smoke else []),
                           *sizes(settings, repeats="repeats", every="every", every_batch1="every_batch1",
                                  train_steps="peer_train_steps", gemm_repeats="roofline_repeats")],
                  stages, peer_env)

    stages["total"] = round(time.perf_counter() - started, 1)
    summary = summarize(results, bundle_path, settings, stages, mode, machine)
    summary["peer_skipped"] = peer is None
    out = results / "all.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    m = summary["machine"]
    note = {"quick": " (--quick: figures not for reporting)", "smoke": " (--smoke: a test, not figures)"}.get(mode, "")
    click.echo(f"\nptbundle benchmark{note}: "
               f"{m.get('cpu_model')}, {m['usable_cores']} cores, {m.get('memory_gb')} GB; "
               f"bundle {Path(bundle_path).name}; GEMM limit {summary['limit']['limit_gflops']:.1f} GFLOP/s "
               f"({summary['limit']['limit_library']}); {stages['total']:.0f} s")
    click.echo(render(summary["table"]))
    load = machine.get("load_average_1_5_15", [0])[0]
    if load > 0.5:
        click.echo(f"note: load average {load} before the run: other work shared the CPU, the figures are low and noisy")
    differs = summary["targets"]["accuracy_not_worse"]["bundle_recipe_differs_in"]
    if differs:
        click.echo(f"note: the bundle was not trained with the default recipe ({', '.join(differs)} differ): "
                   f"its accuracy is not the default recipe's")
    if peer is None:
        click.echo("note: no peer in this run (--no-peer, or --smoke without bench/.peer-venv): its columns are empty")
    click.echo(f"-> {out}")


if __name__ == "__main__":
    main()
