"""bench/ in smoke mode on the tiny random checkpoint: every script runs, exits 0 and writes its results.

Each script runs as a user runs it (`python bench/<kind>/<name>.py --smoke --backbone ... --data ...
--results ...`), in a process of its own.  They start together on first use, two at a time (most of a
smoke run is MindSpore's import and graph compilation), and each test waits for its own.  The PyTorch
peer runs only where bench/.peer-venv is set up (make bench makes it; CI has none); bench/run.py and
time_to_accuracy.py --smoke must skip it, saying so, when its venv is absent.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import build, write_tsv, toy_rows

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def bench_module(path: str, name: str):
    """A bench/ file as a module, with bench/ on sys.path for its `import common`."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench_common = bench_module("common.py", "bench_common")
PEER_PYTHON = bench_common.PEER_VENV / "bin" / "python" if bench_common.peer_ready(bench_common.PEER_VENV) else None
needs_peer = pytest.mark.skipif(PEER_PYTHON is None, reason="no bench/.peer-venv (make bench creates it)")


def run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), "--smoke", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)  # 2 cores, 2 at once


def run_peer(script: str, *args) -> subprocess.CompletedProcess:
    """A bench/peer/ script in the peer's environment, as the harness runs it."""
    done = subprocess.run([str(PEER_PYTHON), str(BENCH / "peer" / script), "--smoke", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200, env=bench_common.peer_environment())
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """The toy task as sentence pairs in GLUE MRPC's columns, and a labelled test file as MSR's (IDs and all)."""
    d = tmp_path_factory.mktemp("pairs")
    header = ("Quality", "#1 String", "#2 String")
    for name, rows in (("train.tsv", toy_rows(64)), ("dev.tsv", toy_rows(24, seed=1))):
        write_tsv(d / name, [("1" if label == "pos" else "0", text, "a great film") for text, label in rows], header)
    write_tsv(d / "msr_paraphrase_test.txt", [("1" if label == "pos" else "0", str(i), str(i + 1), text, "a great film")
                                              for i, (text, label) in enumerate(toy_rows(16, seed=2))],
              ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"))
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
    start("prefix_attention", "perf/prefix_attention.py", *common, "--bundle", bundle)
    start("tuning", "perf/tuning.py", *common, "--bundle", bundle)
    start("heldout", "experiments/heldout.py", *common, "--bundle", bundle, "--bundle", exports / "toy-hard-probe")
    start("time_to_accuracy", "experiments/time_to_accuracy.py", *common, "--bundle", bundle,
          "--peer-venv", tmp_path_factory.mktemp("no-peer-tta") / "venv")
    start("stream_memory", "perf/stream_memory.py", "--data", data)
    start("generate_speed", "perf/generate_speed.py")  # its own tiny Llama; the peer only where its venv is
    start("int8_decoder", "experiments/int8_decoder.py", "--smoke")  # a generation bundle of its own tiny Llama
    merged = request.getfixturevalue("merged_bundle")[0]
    start("serve_load", "perf/serve_load.py", "--data", data, "--bundle", merged, "--bundle", f"single={bundle}")
    start("serve_store", "perf/serve_load.py", *common, "--bundle", bundle, "--store-tasks", "5", "--max-loaded", "3")
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

    assert roofline["prompt"] == {"method": "prefix-tuning", "virtual_tokens": 4, "layer": 0}  # the bundle's (default)

    inference = read(results, "inference")
    configs = {c["config"] for c in inference["results"]}
    # openvino: the test extra installs it; bf16 where this CPU has bf16 units
    bf16 = summary["machine"]["bf16_units"]
    assert configs == {"onnxruntime fp32", "onnxruntime int8", "mindspore fp32", "openvino fp32",
                       *(["openvino bf16"] if bf16 else [])}
    assert inference["prompt"] == roofline["prompt"]
    assert inference["results"][0]["cold_start_seconds"]["median"] > 0  # --smoke: the first backend's only
    for config in inference["results"]:
        for row in config["throughput"]:
            assert row["sentences"] == 24 and row["sentences_per_second"]["median"] > 0
            assert 0 <= row["accuracy"] <= 1 and row["useful_gflop_per_sentence"] > 0
        if not config["config"].startswith("mindspore"):  # int8 and bf16 losses against fp32 are read from these
            assert config["split_accuracy"]["sentences"] == 24 and 0 <= config["split_accuracy"]["accuracy"] <= 1
    # no peer: the issue's ratios are not measured, int8's loss is
    targets = summary["targets"]
    assert all(targets[k]["value"] is None and targets[k]["met"] is None
               for k in ("fp32_vs_course", "fp32_vs_same", "int8_vs_same"))
    assert targets["int8_accuracy_loss_points"]["sentences"] == 24

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
    assert Path(data["text_module"]).is_file() and Path(data["tokenizer"]).is_file()
    same, course = data["peers"]["same"], data["peers"]["course"]
    assert same["method"] == "prefix-tuning" and same["virtual_tokens"] == 4 and Path(same["weights"]).is_file()
    assert len(same["check"]["texts"]) == 8 and np.array(same["check"]["logits"]).shape == (8, 2)
    assert course["weights"] is None and course["virtual_tokens"] == 20  # the toy bundle has no 20-token prompt
    batches = data["train_batches"][0]
    assert len(batches) == 64 // data["recipe"]["batch_size"] and sorted(i for b in batches for i in b) == list(range(64))
    schedule = data["lr_schedules"]["1"]["prompt"]
    assert len(schedule) == 64 // data["recipe"]["batch_size"] and max(schedule) == pytest.approx(data["recipe"]["prompt_lr"])
    init = np.load(results / "peer-inputs" / "init.npz")
    assert init["prompt_embeddings"].shape == (4, 32)  # the peer trains a shallow prompt (PEFT prompt tuning)


def test_fusion_times_both_sides(smoke):
    _, results = finished(smoke, "fusion")
    rows = read(results, "fusion")["rows"]
    assert all(r["ms"]["median"] > 0 for r in rows)
    assert rows[1]["ops_run"] == ["Add", "Add", "LayerNormalization"]  # the runtime's UNFUSED passes off


def test_prefix_attention_kernels_agree_and_the_bundle_runs_one_fused_attention_a_layer(smoke):
    _, results = finished(smoke, "prefix_attention")
    result = read(results, "prefix_attention")
    rows = {r["kernel"]: r for r in result["rows"]}
    assert len(rows) == 4 and all(r["ms"]["median"] > 0 for r in rows.values())
    for name in ("MatMul, MultiHeadAttention past_key/past_value", "MatMul, Concat prefix, MultiHeadAttention"):
        assert rows[name]["max_abs_diff"] < 1e-4  # the same attention as model.onnx's
    assert rows["Attention, prefix as past (model.onnx)"]["ops_run"][-1] == "Attention"
    ops = result["bundle"]["ops"]["model.onnx"]
    assert ops["Attention"] == result["bundle"]["layers"]  # onnxruntime's optimizer kept every layer fused


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


@needs_peer
def test_peer_torch_runs_the_course_and_the_same_method_peers(smoke, tmp_path):
    _, results = finished(smoke, "peer_inputs")
    done = run_peer("peer_torch.py", "--data", results / "peer-inputs", "--results", tmp_path)
    peer = read(tmp_path, "peer")
    same, course = peer["peers"]["same"], peer["peers"]["course"]
    assert same["method"] == "prefix-tuning" and same["logit_check"]["max_abs_diff"] < 1e-4, same["logit_check"]
    assert course["virtual_tokens"] == 20 and course["weights"] is None and "logit_check" not in course
    assert all(r["sentences_per_second"]["median"] > 0 for p in (same, course) for r in p["inference"])
    assert peer["gemm"]["layer_gflops"] > 0 and peer["training"]["seconds_per_step"]["median"] > 0
    assert "max abs difference" in done.stdout


@pytest.fixture(scope="module")
def prefix_inputs(tiny_bert, toy_files, tmp_path_factory):
    """peer_inputs.py's data for a prefix-tuning bundle on the tiny checkpoint (3 virtual tokens, from layer 0)."""
    out = tmp_path_factory.mktemp("prefix")
    build(["export", "--train", str(toy_files[0]), "--dev", str(toy_files[1]), "--backbone", str(tiny_bert),
           "--prompt", "soft", "--method", "prefix-tuning", "--virtual-tokens", "3", "--epochs", "1",
           "--batch-size", "8", "--out", str(out), "--name", "prefix"])
    done = run("peer/peer_inputs.py", "--bundle", out / "prefix", "--backbone", tiny_bert,
               "--data", toy_files[0].parent, "--results", out, "--peers", "same")
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "peer-inputs"


def test_peer_inputs_name_the_bundle_method_and_its_logits(prefix_inputs):
    data = json.loads((prefix_inputs / "data.json").read_text())
    assert list(data["peers"]) == ["same"]  # --peers same
    same = data["peers"]["same"]
    assert same["method"] == "prefix-tuning" and same["virtual_tokens"] == 3 and same["projection"] == 0
    assert np.array(same["check"]["logits"]).shape == (8, 2)


def test_peft_has_no_late_prompt_nor_a_prefix_above_layer_0():
    assert bench_common.no_peft_equivalent("prefix-tuning") is None
    assert "layer 2" in bench_common.no_peft_equivalent("prefix-tuning", 2)
    assert bench_common.no_peft_equivalent("late-prompt", 3)
    assert bench_common.no_peft_equivalent("prompt-tuning", 0, "cls")


@needs_peer
def test_peft_prefix_tuning_gives_the_prefix_bundles_logits(prefix_inputs, tmp_path):
    done = run_peer("peer_torch.py", "--data", prefix_inputs, "--results", tmp_path, "--skip", "gemm,training")
    same = read(tmp_path, "peer")["peers"]["same"]
    assert same["method"] == "prefix-tuning" and same["virtual_tokens"] == 3
    assert same["logit_check"]["max_abs_diff"] < 1e-4, done.stdout  # 4.8e-7 measured
    assert all(r["sentences_per_second"]["median"] > 0 for r in same["inference"])


@needs_peer
def test_peer_finetune_trains_every_weight_and_scores_test_once(prefix_inputs, tmp_path):
    done = run_peer("peer_finetune.py", "--data", prefix_inputs, "--results", tmp_path, "--epochs", "1")
    result = read(tmp_path, "finetune_peer")
    assert result["trainable_parameters"] > 1000  # the tiny encoder's, not a head's 66
    assert result["changed_tensors"] == result["tensors"] > 30  # every weight moved, the encoder's too
    assert len(result["curve"]) == 1 and 0 <= result["test_accuracy"] <= 1, done.stdout


def test_flop_count_knows_the_prompt_method():
    roofline = bench_module("perf/roofline.py", "bench_roofline")
    cfg = roofline.ModelShape(hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4)
    text, p, h = 10, 3, 32

    def flops(method, layer=0, length=text, tokens=p):
        return roofline.flops_per_sequence(length, roofline.PromptShape(method, tokens, layer), cfg)

    none = flops("none")
    assert flops("prompt-tuning") == flops("none", length=text + p)  # P more positions in every layer
    attention_keys = 2 * (2 * text * p * h)  # P more keys: scores and context of the text's rows
    assert flops("prefix-tuning") - none == 4 * attention_keys  # no more rows, P keys in each layer
    assert flops("prefix-tuning", layer=1) - none == 3 * attention_keys
    assert flops("late-prompt", layer=2) - none == (flops("prompt-tuning") - none) / 2  # 2 of 4 layers


def test_run_checks_the_issue_targets_at_batch_64_sorted():
    harness = bench_module("run.py", "bench_run")

    def rows(rate):
        return [{"batch_size": size, "sorted": True, "sentences_per_second": {"min": r, "median": r, "max": r}}
                for size, r in ((8, rate / 2), (64, rate))]

    inference = {"split": "test", "results": [
        {"config": "onnxruntime fp32", "throughput": rows(150.0), "split_accuracy": {"sentences": 1068, "accuracy": 0.8006}},
        {"config": "onnxruntime int8", "throughput": rows(320.0), "split_accuracy": {"sentences": 1068, "accuracy": 0.7950}}]}
    peer = {"peers": {"course": {"label": "course", "inference": rows(70.0)},
                      "same": {"label": "same", "inference": rows(100.0)}}}
    table, targets = harness.issue_rows(inference, peer)
    assert targets["fp32_vs_course"]["value"] == pytest.approx(150 / 70, abs=1e-3) and targets["fp32_vs_course"]["met"]
    assert targets["fp32_vs_same"]["value"] == 1.5 and targets["fp32_vs_same"]["met"]
    assert targets["int8_vs_same"]["value"] == 3.2 and targets["int8_vs_same"]["met"]
    assert targets["int8_accuracy_loss_points"]["value"] == 0.56 and targets["int8_accuracy_loss_points"]["met"] is False
    assert [r["met"] for r in table] == ["yes", "yes", "yes", "NO"]
    peer["peers"]["same"] = {"label": "same method (late-prompt, 20 virtual tokens)", "skipped": "no PEFT equivalent"}
    table, targets = harness.issue_rows(inference, peer)
    assert targets["fp32_vs_same"]["met"] is None and targets["fp32_vs_same"]["skipped"] == "no PEFT equivalent"
    assert table[1]["peer"] == "skipped" and targets["fp32_vs_course"]["met"]


def test_time_to_accuracy_reads_our_training_log_and_skips_a_missing_peer(smoke):
    done, results = finished(smoke, "time_to_accuracy")
    assert "peer skipped: no PyTorch environment" in done.stderr and "PEFT skipped" in done.stdout
    result = read(results, "time_to_accuracy")
    curve = json.loads((Path(result["bundle"]) / "training_log.json").read_text())
    best = max(curve, key=lambda point: point["dev"]["accuracy"])  # the first epoch at the best accuracy
    assert result["ours"]["dev_accuracy"] == best["dev"]["accuracy"] and result["ours"]["seconds"] == best["seconds"]
    assert result["ours"]["train_seconds"] == curve[-1]["seconds"] > 0
    assert result["peer_skipped"] and result["peers"] == {} and result["ratio"] is None and result["met"] is None
    assert result["at_common_accuracy"] is None


@needs_peer
def test_time_to_accuracy_trains_both_peft_methods_to_our_accuracy(tiny_build, tiny_bert, toy_files, tmp_path):
    done = run("experiments/time_to_accuracy.py", "--bundle", tiny_build[0] / "toy-soft", "--backbone", tiny_bert,
               "--data", toy_files[0].parent, "--results", tmp_path, "--peer-venv", bench_common.PEER_VENV)
    assert done.returncode == 0, done.stderr[-3000:]
    result = read(tmp_path, "time_to_accuracy")
    assert set(result["peers"]) == {"prompt-tuning", "prefix-tuning"} and result["better"] in result["peers"]
    for method, peer in result["peers"].items():
        assert peer["method"] == method and peer["virtual_tokens"] == 20 and peer["max_epochs"] == 1
        assert peer["target"] == round(result["ours"]["dev_accuracy"], 4)
        checks = peer["checks"]
        assert [c["epoch"] for c in checks] == [0.5, 1.0][: len(checks)]  # --smoke: 2 checks in 1 epoch
        assert all(c["train_seconds"] > 0 and c["eval_seconds"] >= 0 for c in checks)
        assert peer["reached"] == (checks[-1]["dev_accuracy"] >= peer["target"])  # it stops once there
    assert result["ratio"] > 0 and "ours / PEFT" in done.stdout
    point, peer = result["at_common_accuracy"], result["peers"][result["better"]]  # the lower of the two bests
    assert point["dev_accuracy"] == min(round(result["ours"]["dev_accuracy"], 4), peer["best_accuracy"])
    assert 0 < point["ours_seconds"] <= result["ours"]["seconds"] and 0 < point["peer_seconds"] <= peer["best_seconds"]


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
    assert set(result["methods"].values()) == {"prefix-tuning"}  # the default recipe's: merge folds it
    assert (Path(result["merged"]) / "model.int8.onnx").is_file()  # pt-build merge --quantize int8
    # int8 on each task's test split: MR's toy data has none (dev), MRPC's is msr_paraphrase_test.txt, spam's one file
    tests = result["test_accuracy"]
    assert {t: (r["split"], r["n"]) for t, r in tests.items()} == {"mr": ("dev", 24), "mrpc": ("test", 16),
                                                                    "spam": ("test", 24)}
    for task, row in tests.items():
        assert all(0 <= row[k] <= 1 for k in ("own_fp32", "own_int8", "merged_fp32", "merged_int8")), (task, row)
        assert row["merged_fp32"] == row["own_fp32"], (task, row)  # the parity above, on other rows
        assert row["int8_merged_minus_own_fp32"] == round(100 * (row["merged_int8"] - row["own_fp32"]), 2)
    parity, claim = result["claims"]
    assert parity["met"] and parity["exit_1_if_not"] and parity["verdict"] == "yes"
    assert claim["claim"] == "each task's merged int8 within 0.5 pt of its own fp32 bundle"
    assert claim["values"] == {t: r["int8_merged_minus_own_fp32"] for t, r in tests.items()}
    assert not claim["exit_1_if_not"] and claim["target_points"] == 0.5
    assert claim["met"] == all(abs(v) <= 0.5 for v in claim["values"].values())  # reported, not an exit 1
    assert claim["verdict"] == ("yes" if claim["met"] else "NO")


def test_serve_load_checks_every_answer_in_every_phase(smoke):
    _, results = finished(smoke, "serve_load")
    result = read(results, "serve_load")
    phases = result["phases"]
    assert set(phases) == {"sequential", "concurrent", "faults", "sigterm"} and result["ok"]
    assert phases["sequential"]["ok"] == 40 and phases["concurrent"]["ok"] == 120  # --smoke sizes, all answered
    assert all(p["wrong"] == 0 for p in phases.values())
    assert set(result["tasks"]) == {"sentiment", "zeroshot", "probe", "pairs", "prefix", "prefix1", "late", "single"}
    assert sum(phases["concurrent"]["batch_sizes"].values()) > 0 and phases["faults"]["disconnected"] == 20
    assert sum(phases["faults"]["bad"].values()) == 20 and all(400 <= int(k) < 500 for k in phases["faults"]["bad"])


def test_serve_store_runs_its_entries_on_one_graph_through_loads_and_unloads(smoke):
    _, results = finished(smoke, "serve_store")
    result = read(results, "serve_store")
    assert result["ok"] and result["entries"] == 5 and result["graphs_open"] == 1
    store, churn = result["phases"]["store"], result["phases"]["churn"]
    assert store["ok"] == 120 and store["wrong"] == 0  # --smoke: 120 requests a phase, every answer checked
    assert churn["ok"] + churn["refused_unloaded"] == 120 and churn["wrong"] == 0
    assert churn["repository"]["cycles"] >= 1 and not churn["repository"]["failures"]
    assert set(result["baseline"]) == {"batch 4 in request order", "batch 4 sorted", "batch 64 sorted"}
    bounded = result["phases"]["bounded"]  # 5 entries in turn, at most 3 loaded: requests load and unload them
    assert bounded["ok"] == 120 and bounded["wrong"] == 0 and bounded["max_loaded"] == 3
    assert bounded["loads"] >= bounded["evictions"] > 0
    adapters = result["adapters"]  # 3 copies of toy-soft's peft/, loaded as rows of the open graph
    assert adapters["repository"]["adapters"] == 3 and not adapters["repository"]["failures"]
    assert adapters["ok"] == 120 and adapters["wrong"] == 0 and adapters["repository"]["load_ms"]["p50"] > 0


def test_stream_memory_reads_back_every_line_in_order(smoke):
    _, results = finished(smoke, "stream_memory")
    result = read(results, "stream_memory")
    assert result["tiny"] and len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["output_lines_in_order"] == row["lines"] > 0 and row["peak_rss_mb"] > 0


def test_int8_decoder_compares_the_candidates_with_fp32(smoke):
    _, results = finished(smoke, "int8_decoder")
    result = read(results, "int8_decoder-smoke")
    rows = result["candidates"]
    assert set(rows) == {"fp32", "dynamic", "dynamic-no-down", "nbits8-b32", "nbits8-b32-head", "nbits8-b128",
                         "nbits4-b32"}
    assert rows["fp32"]["teacher_forced_top1_agreement"] == 1.0 and rows["fp32"]["max_rel_logit_diff"]["max"] == 0
    assert rows["nbits8-b32-head"]["ops"]["MatMulNBits"] > 0 and rows["nbits8-b32-head"]["ops"]["Gemm"] == 0
    assert rows["dynamic"]["ops"]["MatMulInteger"] > 0 and rows["nbits8-b32"]["ops"]["Gemm"] == 1  # head fp32
    for row in rows.values():
        assert row["decode_tokens_per_s"]["median"] > 0


def test_generate_speed_times_our_generation_bundles(smoke):
    _, results = finished(smoke, "generate_speed")
    result = read(results, "generate_speed")
    for contender in ("ours fp32 prompt", "ours fp32 none", "ours int8 prompt", "ours int8 none"):
        figures = result["figures"][contender]
        assert figures["decode_tokens_per_s"]["median"] > 0 and figures["ttft_ms"]["median"] > 0
    for kind in ("fp32", "int8"):  # the paired TTFT ratio: prompted over plain, per prompt
        pairs = result["ttft_pairs"][kind]
        assert pairs["rounds"] == 3 and 0 < pairs["ratio"]["min"] <= pairs["ratio"]["max"]
        assert "ttft_prompt_over_none (%s, paired)" % kind in result["targets"]
    if PEER_PYTHON is not None:  # greedy tokens of the fp32 bundle equal transformers + PEFT's
        assert result["parity"]["fp32"]["match"] == result["parity"]["prompts"]
    else:
        assert result["peer_skipped"]


def test_bench_reaches_the_builder_through_its_public_modules_only():
    """bench/ names builder code through ptbundle.builder (building) and ptbundle.builder.lab (the building blocks
    measured), never a module inside a layer: a move inside builder/ then breaks no benchmark."""
    import re

    public = {"ptbundle.builder", "ptbundle.builder.lab", "ptbundle.builder.api"}
    used = {m for f in BENCH.rglob("*.py") for m in re.findall(r"ptbundle\.builder[\w.]*", f.read_text())}
    assert used and used <= public, sorted(used - public)


def test_tuning_times_every_variant_and_budget_and_says_what_a_first_load_chose(smoke):
    _, results = finished(smoke, "tuning")
    result = read(results, "tuning")
    assert result["machine"]["cpu_model"] is not None and "simd" in result["machine"]
    assert set(result["graphs"]) == {"fp32", "int8"}  # the toy bundle has an int8 graph
    for graph in result["graphs"].values():
        measured = {(r["variant"], r["token_budget"]) for r in graph["rows"]}
        assert measured == {(v, b) for v in ("fused", "unfused") for b in (None, 2048, 1024, 512)}
        assert all(r["sentences_per_second"]["median"] > 0 for r in graph["rows"])
        chosen = graph["chosen_by_first_load"]
        assert (chosen["variant"], chosen["token_budget"]) in measured and 0 < graph["chosen_over_best"] <= 1


def test_multitask_scale_times_merged_bundles_against_their_one_task_source(tiny_build, tiny_bert, toy_files,
                                                                           tmp_path):
    done = run("perf/multitask_scale.py", "--bundle", tiny_build[0] / "toy-soft", "--backbone", tiny_bert,
               "--data", toy_files[0].parent, "--results", tmp_path)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = read(tmp_path, "multitask_scale")
    rows = {r["tasks"]: r for r in result["rows"]}
    assert sorted(rows) == [1, 2, 5]  # --smoke's counts; 1 is the bundle itself
    for n, row in rows.items():
        int8 = row["int8"]
        assert int8["measured"] != bool(int8["skipped"]), int8  # int8 measured, or skipped saying why
        precisions = ["fp32", "int8"] if int8["measured"] else ["fp32"]
        assert [(t["precision"], t["batch_size"]) for t in row["throughput"]] == [(p, b) for p in precisions
                                                                                  for b in (1, 4)]
        for t in row["throughput"]:
            assert t["sentences_per_second"]["median"] > 0 and t["sentences"] == 16
            assert isinstance(t["ratio"], float) and t["ratio"] > 0, (n, t)  # merged / one-task, same run
        assert set(row["load"]) == set(precisions) and all(p["peak_rss_mb"] > 0 for p in row["load"].values())
        if n > 1:
            c = row["correctness"]
            assert c["ok"] and c["max_abs_diff"] <= 1e-4 and c["checked_against_reference"] >= 2, c
            assert c["tasks"][0]["task"] == "t0000" and c["tasks"][0]["reference"] == "source bundle"
            # the tables stored once: within 1.05 x (backbone + N x one task's arrays)
            assert row["merge"]["seconds"] > 0 and row["size"]["within_bound"], row["size"]
    assert all(r["ratio"] == 1.0 for r in rows[1]["throughput"])
    against = rows[5]["against_2"]  # the largest N against 2 tasks, pass for pass
    assert [(t["precision"], t["batch_size"]) for t in against] == [(t["precision"], t["batch_size"])
                                                                    for t in rows[5]["throughput"]]
    assert all(t["ratio"] > 0 and t["base_same_window"]["median"] > 0 for t in against)
    add = result["add"]
    assert add["tasks_before"] == 5 and add["tasks_after"] == 6 and add["bit_identical"] and add["ok"]


def test_merge_check_merges_the_three_bundles_and_checks_each_task_against_its_own(tiny_build, tiny_bert, toy_files,
                                                                                   tmp_path):
    done = run("experiments/merge_check.py", "--exports", tiny_build[0], "--name", "toy", "--backbone", tiny_bert,
               "--data", toy_files[0].parent, "--results", tmp_path)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = read(tmp_path, "merge_check")
    assert result["smoke"] and (result["split"], result["sentences"]) == ("dev", 24)  # the toy data has no test split
    assert result["merge_seconds"] > 0 and "--quantize" in result["merge_command"]
    tasks = result["tasks"]
    assert set(tasks) == {"soft", "zeroshot", "probe"}
    assert sum(row["mixed_rows"] for row in tasks.values()) == 24  # every row went to one task, at random
    for task, row in tasks.items():
        assert row["mixed_rows"] > 0 and row["labels"] == ["neg", "pos"], (task, row)
        assert row["fp32_mixed_max_abs_diff"] <= 1e-4 and row["fp32_alone_max_abs_diff"] <= 1e-4, (task, row)
        assert row["merged_fp32"] == row["own_fp32"], (task, row)  # the same sentences right
        assert all(0 <= row[k]["accuracy"] <= 1 for k in ("own_fp32", "own_int8", "merged_fp32", "merged_int8"))
        cli = row["predict_cli"]
        assert cli["ok"] and cli["lines"] == cli["labels_equal"] == 8 and cli["max_probability_diff"] <= 1e-4, cli
    assert result["parity_ok"] and result["failed"] == []
    assert [c["met"] for c in result["claims"] if c["exit_1_if_not"]] == [True, True, True]
    precision = result["table_precision"]
    assert precision["task"] == "soft" and precision["tables"] and all(n.startswith("task.") for n in precision["tables"])
    assert set(precision["rows"]) == {"fp32", "fp16", "bf16"}
    for kind in ("fp16", "bf16"):
        row = precision["rows"][kind]
        assert row["max_abs_diff"] >= 0 and 0 <= row["accuracy"] <= 1 and 0 <= row["predictions_changed"] <= 24
        assert row["tables_rounded"] == len(precision["tables"]) and row["max_abs_rounding"] > 0
    assert result["merged"] is None  # no --workdir: the temporary one is removed
