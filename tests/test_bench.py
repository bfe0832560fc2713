"""bench/ in smoke mode on the tiny random checkpoint: every script runs, exits 0 and writes its results.

Each script runs as a user runs it (`python bench/<kind>/<name>.py --smoke --backbone ... --data ...
--results ...`), in a process of its own.  They start together on first use, two at a time (most of a
smoke run is MindSpore's import and graph compilation), and each test waits for its own.  The PyTorch
peer runs only where torch imports; bench/run.py --smoke must skip it, saying so, when its venv is absent.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import write_tsv, toy_rows

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), "--smoke", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)  # 2 cores, 2 at once


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """The toy task as sentence pairs in GLUE MRPC's columns."""
    d = tmp_path_factory.mktemp("pairs")
    header = ("Quality", "#1 String", "#2 String")
    for name, rows in (("train.tsv", toy_rows(64)), ("dev.tsv", toy_rows(24, seed=1))):
        write_tsv(d / name, [("1" if label == "pos" else "0", text, "a great film") for text, label in rows], header)
    return d


@pytest.fixture(scope="module")
def smoke(request, tiny_bert, toy_files, pairs_dir, tmp_path_factory):
    """name -> (future CompletedProcess, results dir) of every project-side script's smoke run.

    The scripts that need no bundle start first and run while tiny_build trains the bundles.
    """
    data = toy_files[0].parent
    common = ["--backbone", tiny_bert, "--data", data]
    pool = ThreadPoolExecutor(2)
    started = {}

    def start(name, script, *args):
        results = tmp_path_factory.mktemp(f"results-{name}")
        started[name] = (pool.submit(run, script, *args, "--results", results), results)

    start("mrpc", "experiments/mrpc.py", "--backbone", tiny_bert, "--data", pairs_dir)
    start("profile_step", "perf/profile_step.py", *common)
    start("zero_shot_search", "experiments/zero_shot_search.py", *common, "--label-text", "pos=great",
          "--label-text", "neg=dull")
    start("fusion", "perf/fusion.py", *common)
    # spam: the toy dev file alone, so its prompt differs from the MR task's and a row run as the wrong task shows
    start("multitask", "experiments/multitask.py", *common, "--mrpc-data", pairs_dir, "--spam-data", toy_files[1])
    exports = request.getfixturevalue("tiny_build")[0]
    bundle = exports / "toy-soft"
    start("run", "run.py", *common, "--bundle", bundle, "--peer-venv", tmp_path_factory.mktemp("no-peer") / "venv")
    start("peer_inputs", "peer/peer_inputs.py", *common, "--bundle", bundle)
    start("int8_choice", "experiments/int8_choice.py", "--bundle", bundle, "--data", data, "--splits", "dev",
          "--workdir", tmp_path_factory.mktemp("int8-work"))
    start("heldout", "experiments/heldout.py", *common, "--bundle", bundle, "--bundle", exports / "toy-hard-probe")
    start("stream_memory", "perf/stream_memory.py", "--data", data)
    merged = request.getfixturevalue("merged_bundle")[0]
    start("serve_load", "perf/serve_load.py", "--data", data, "--bundle", merged, "--bundle", f"single={bundle}")
    yield started
    pool.shutdown(wait=True)


def finished(smoke, name: str) -> tuple:
    """(the process, its results dir), after checking it exited 0."""
    future, results = smoke[name]
    done = future.result()
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done, results


def read(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    assert path.is_file(), f"no {path}"
    return json.loads(path.read_text())


def test_run_smoke_measures_every_stage_and_skips_the_missing_peer(smoke):
    done, results = finished(smoke, "run")
    assert "peer skipped: no PyTorch environment" in done.stderr
    summary = read(results, "all")
    assert summary["mode"] == "smoke" and summary["peer_skipped"] and summary["peer"] is None
    assert {"limit", "targets", "table", "stage_seconds", "machine", "versions"} <= set(summary)
    assert set(summary["stage_seconds"]) >= {"roofline", "inference", "train_step", "total"}

    roofline = read(results, "roofline")
    assert set(roofline["libraries"]) == {"numpy", "mindspore", "onnxruntime"}
    assert roofline["limit_gflops"] > 0 and roofline["model"]["hidden_size"] == 32  # the tiny checkpoint's

    inference = read(results, "inference")
    configs = {c["config"] for c in inference["results"]}
    assert configs == {"onnxruntime fp32", "onnxruntime int8", "mindspore fp32"}
    assert inference["results"][0]["cold_start_seconds"]["median"] > 0  # --smoke: the first backend's only
    for config in inference["results"]:
        for row in config["throughput"]:
            assert row["sentences"] == 24 and row["sentences_per_second"]["median"] > 0
            assert 0 <= row["accuracy"] <= 1 and row["useful_gflop_per_sentence"] > 0

    train = read(results, "train_step")
    assert train["steps"] == 2 and train["seconds_per_step"]["median"] > 0
    assert train["virtual_tokens"] == 4  # the bundle's prompt length, passed on by run.py
    assert train["steps_per_epoch"] == 64 // train["batch_size"]


def test_mrpc_builds_scores_and_predicts_pairs(smoke):
    done, results = finished(smoke, "mrpc")
    result = read(results, "mrpc")
    assert 0 <= result["dev_accuracy"] <= 1 and 0 <= result["dev_f1"] <= 1
    assert result["majority_baseline"]["accuracy"] == 0.5  # the toy dev set is balanced
    assert result["manifest_metrics"]["test"]["n"] == 24
    assert (Path(result["bundle"]) / "manifest.json").is_file()
    assert len(re.findall(r"^[01]\t", done.stdout, re.M)) == 2  # pt-run predict's two pairs


def test_profile_step_lists_kernels(smoke):
    _, results = finished(smoke, "profile_step")
    result = read(results, "profile_step")
    assert result["shape"] == [16, 32] and result["kernel_ms_per_step"] > 0
    assert any(k["type"] == "MatMul" for k in result["kernels"])


def test_zero_shot_search_ranks_on_dev(smoke):
    _, results = finished(smoke, "zero_shot_search")
    result = read(results, "zero_shot_search")
    assert len(result["rows"]) == 2 * 1 * 2  # 2 templates, the --label-text verbalizer, raw and calibrated
    ranked = [r["dev_accuracy"] for r in result["rows"]]
    assert ranked == sorted(ranked, reverse=True)  # chosen on dev: the best row comes first
    assert all(0 <= r["dev_accuracy"] <= 1 for r in result["rows"])
    assert result["best_test_accuracy"] is None  # toy_files has no test file


def test_peer_inputs_are_ours(smoke):
    _, results = finished(smoke, "peer_inputs")
    data = json.loads((results / "peer-inputs" / "data.json").read_text())
    assert data["labels"] == ["neg", "pos"] and data["recipe"]["virtual_tokens"] == 4
    assert Path(data["text_module"]).is_file() and Path(data["head"]).is_file()
    batches = data["train_batches"][0]
    assert len(batches) == 64 // 16 and sorted(i for b in batches for i in b) == list(range(64))
    schedule = data["lr_schedules"]["1"]["prompt"]
    assert len(schedule) == 64 // 16 and max(schedule) == pytest.approx(data["recipe"]["prompt_lr"])
    import numpy as np

    init = np.load(results / "peer-inputs" / "init.npz")
    assert init["prompt_embeddings"].shape == (4, 32)


def test_fusion_times_both_sides(smoke):
    _, results = finished(smoke, "fusion")
    rows = read(results, "fusion")["rows"]
    assert all(r["ms"]["median"] > 0 for r in rows)
    assert rows[1]["ops_run"] == ["Add", "Add", "LayerNormalization"]  # the runtime's UNFUSED passes off


def test_heldout_scores_each_domain(smoke):
    _, results = finished(smoke, "heldout")
    result = read(results, "heldout")
    assert result["sizes"] == {"dev": 24, "train": 22}  # every 3rd of 64 with --smoke
    assert [r["kind"] for r in result["rows"]] == ["soft", "hard probe"]
    assert all(0 <= r["all"] <= 1 and r["test_accuracy"] is not None for r in result["rows"])


def test_int8_choice_builds_the_shipped_graph_among_the_candidates(smoke):
    _, results = finished(smoke, "int8_choice")
    candidates = read(results, "int8_choice")["candidates"]
    assert set(candidates) == {"fp32", "dyn-s8", "fixed-s8-rr"}
    # fixed scales make a row's logits independent of its batch; dynamic ones take the batch's range
    assert candidates["fixed-s8-rr"]["batch_independence_max_abs"] < 1e-4
    assert candidates["fixed-s8-rr"]["ops"].get("DynamicQuantizeLinear", 0) == 0
    assert candidates["dyn-s8"]["ops"].get("DynamicQuantizeLinear", 0) > 0


def test_peer_torch_smoke(smoke, tmp_path):
    """Only where torch, transformers and peft import (the peer's venv, not the project's)."""
    for module in ("torch", "transformers", "peft"):
        pytest.importorskip(module)
    _, results = finished(smoke, "peer_inputs")
    done = run("peer/peer_torch.py", "--data", results / "peer-inputs", "--results", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    peer = read(tmp_path, "peer")
    assert peer["gemm"]["layer_gflops"] > 0 and peer["training"]["seconds_per_step"]["median"] > 0
    assert all(r["sentences_per_second"]["median"] > 0 for r in peer["inference"])


def test_product_code_is_imported_in_one_place():
    """Scripts call the product through bench/common.py (a rename is one edit there); the peer imports none."""
    scripts = [p for p in sorted(BENCH.rglob("*.py")) if p.name != "common.py" and ".peer-venv" not in p.parts]
    assert len(scripts) >= 12 and BENCH / "experiments" / "int8_choice.py" in scripts
    for script in scripts:
        source = script.read_text()
        assert not re.search(r"^\s*(from|import) ptbundle", source, re.M), f"{script} imports ptbundle"
        assert "--smoke" in source or "common.options" in source, f"{script} has no --smoke"
    peer = (BENCH / "peer" / "peer_torch.py").read_text()
    assert not re.search(r"^\s*(from|import) mindspore", peer, re.M)


def test_multitask_merged_rows_match_their_own_bundles(smoke):
    _, results = finished(smoke, "multitask")
    result = read(results, "multitask")
    assert set(result["tasks"]) == {"mr", "mrpc", "spam"}
    for task, row in result["tasks"].items():
        assert row["n"] == 20 and row["max_abs_diff"] <= 1e-4, (task, row)  # --smoke: 20 of each 24-row dev set
        assert row["merged_accuracy"] == row["single_accuracy"], (task, row)
    assert result["parity_ok"] and result["speed"]["mixed_sentences_per_second"]["median"] > 0
    assert [line.split("\t")[0] for line in result["predict_cli"]] == ["mr", "mrpc", "spam"]  # pt-run predict's tasks


def test_serve_load_checks_every_answer_in_every_phase(smoke):
    _, results = finished(smoke, "serve_load")
    result = read(results, "serve_load")
    phases = result["phases"]
    assert set(phases) == {"sequential", "concurrent", "faults", "sigterm"} and result["ok"]
    assert phases["sequential"]["ok"] == 40 and phases["concurrent"]["ok"] == 120  # --smoke sizes, all answered
    assert all(p["wrong"] == 0 for p in phases.values())
    assert set(result["tasks"]) == {"sentiment", "zeroshot", "probe", "pairs", "single"}
    assert sum(phases["concurrent"]["batch_sizes"].values()) > 0 and phases["faults"]["disconnected"] == 20
    assert sum(phases["faults"]["bad"].values()) == 20 and all(400 <= int(k) < 500 for k in phases["faults"]["bad"])


def test_stream_memory_reads_back_every_line_in_order(smoke):
    _, results = finished(smoke, "stream_memory")
    result = read(results, "stream_memory")
    assert result["tiny"] and len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["output_lines_in_order"] == row["lines"] > 0 and row["peak_rss_mb"] > 0
