"""What the benchmarks share: their options, figures as min/median/max, the machine, and the product's functions.

Scripts run as `python bench/<kind>/<name>.py` and put bench/ on sys.path to
import this as `common`.  Every ptbundle name bench/ uses is in PRODUCT, the
last section here (a rename in the product is one edit), imported on first
use: importing this module imports the standard library only, so the
PyTorch peer (bench/peer/peer_torch.py, in a venv without ptbundle or click)
uses it too.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# --- options every script takes ---------------------------------------------------------

DATA_HELP = ("'mr' (the shipped MR, canonical split), a directory with train and dev files (test optional; "
             ".tsv, .csv or .jsonl, columns text and label), or one labelled file (read as every split).")


def options(data: str = "mr", data_help: str = DATA_HELP, backbone_help: str | None = None):
    """--backbone, --data, --smoke and --results, as click options."""
    import click

    def decorate(f):
        f = click.option("--results", type=click.Path(file_okay=False), default=str(RESULTS), show_default="bench/results",
                         help="Directory that receives the results JSON.")(f)
        f = click.option("--smoke", is_flag=True,
                         help="Tiny sizes (a few sentences and steps, one repeat): seconds on a tiny checkpoint.")(f)
        f = click.option("--data", default=data, show_default=True, help=data_help)(f)
        return click.option("--backbone", default=None,
                            help=backbone_help or "Checkpoint directory, .gguf file or smollm2, as pt-build's"
                                                  " [default: the shipped all-MiniLM-L6-v2].")(f)
    return decorate


def write_results(results: str | Path, name: str, result: dict) -> Path:
    out = Path(results) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}", flush=True)
    return out


# --- figures ----------------------------------------------------------------------------

def spread(values, digits: int = 3) -> dict:
    """min/median/max, the form every figure of these benchmarks takes."""
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}


def verdict(ok) -> str:
    """A target's cell: met, not met, or not measured."""
    return "-" if ok is None else ("yes" if ok else "NO")


def every_kth(items, k: int) -> list:
    """An evenly spaced subset: MR test lists all negative reviews, then all positive,
    so a prefix would be one label only; every k-th item keeps both and all lengths."""
    return list(items[::k]) if k > 1 else list(items)


def subset_name(total: int, k: int) -> str:
    return f"all {total}" if k <= 1 else f"every {k}th of {total} ({math.ceil(total / k)})"


def layer_gemm_shapes(tokens: int, hidden: int, intermediate: int) -> list:
    """(name, M, K, N) of the four weight GEMMs of one encoder layer over `tokens` rows."""
    return [("qkv", tokens, hidden, 3 * hidden),  # builder/model.py fuses query, key and value into one Dense
            ("attn_out", tokens, hidden, hidden),
            ("ffn_up", tokens, hidden, intermediate),
            ("ffn_down", tokens, intermediate, hidden)]


def time_calls(call, sync, repeats: int, min_seconds: float = 0.05) -> list:
    """Seconds per call, `repeats` samples; each sample averages enough calls to last min_seconds."""
    sync(call())  # warm-up: first-call allocation, thread pool start
    t = time.perf_counter()
    sync(call())
    inner = max(1, int(min_seconds / max(time.perf_counter() - t, 1e-6)))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner - 1):
            call()
        sync(call())  # calls may be queued: the last one's result waits for all of them
        samples.append((time.perf_counter() - t) / inner)
    return samples


# --- the machine --------------------------------------------------------------------------

def openvino_installed() -> bool:
    """The openvino extra is there (found without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def machine_info() -> dict:
    """CPU model, cores, memory, SIMD flags and load, read from /proc where there is one."""
    cpu = product("cpu")()  # the runtime's own reading: model name and the flags that decide kernels
    info = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cores": product("cpu_threads")(),
            "cpu_model": cpu["model"], "simd": cpu["flags"], "bf16_units": product("bf16_units")()}
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total = next((l for l in meminfo.read_text().splitlines() if l.startswith("MemTotal:")), None)
        if total:
            info["memory_gb"] = round(int(total.split()[1]) / 2**20, 1)
    if hasattr(os, "getloadavg"):
        # Other work on the machine slows every figure: the load before the run says whether there was any.
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return info


def npm_tarball(package: str, tarball: str, sha256: str) -> Path:
    """A data package from the npm registry (`npm pack`), fetched once into bench/.cache/ and checked."""
    import hashlib
    import subprocess

    cache = ROOT / "bench" / ".cache"
    path = cache / tarball
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", package, "--silent"], cwd=cache, check=True, capture_output=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {sha256}")
    return path


def tool(name: str) -> str:
    """pt-build / pt-run of this interpreter's environment."""
    return str(Path(sys.executable).parent / name)


def log(message: str) -> None:
    """A progress line on stderr, timestamped."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def recipe_differences(recipe: dict, reference: dict, ignore=()) -> list:
    """Fields of `reference` (a recipe as JSON) that `recipe` (a bundle's) does not share."""
    return sorted(k for k, v in reference.items() if k not in ignore and recipe.get(k) != v)


# --- the PyTorch peer's environment (bench/.peer-venv) ------------------------------------

PEER_VENV = ROOT / "bench" / ".peer-venv"
TORCH = "torch==2.13.0"  # the CPU wheel in /opt/wheels (pip's global find-links); never the CUDA build
PEER_PACKAGES = [TORCH, "numpy<2", "transformers==5.23.0", "peft==0.21.2", "safetensors==0.8.0",
                 "tokenizers==0.23.3"]
PEFT_METHODS = ("prompt-tuning", "prefix-tuning")  # the prompt methods PEFT has (as PromptTuningConfig, PrefixTuningConfig)


def no_peft_equivalent(method: str, layer: int = 0, pooling: str = "mean") -> str | None:
    """Why PEFT (as the peer builds it) cannot run this prompt, or None when it can."""
    if method not in PEFT_METHODS:
        return f"{method}: PEFT has no such prompt method"
    if layer:
        return f"{method} from layer {layer}: PEFT's prefix starts at layer 0, it has no equivalent"
    if pooling != "mean":
        return f"{pooling} pooling: the peer pools the mean of the text only"
    return None


def peer_ready(venv: Path) -> bool:
    stamp = venv / ".installed"
    return stamp.is_file() and stamp.read_text().strip() == " ".join(PEER_PACKAGES) and (venv / "bin" / "python").exists()


def ensure_peer_venv(venv: Path, stages: dict) -> Path:
    """bench/.peer-venv with torch (CPU) + transformers + peft; created once, checked every time."""
    import subprocess

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
    import subprocess

    import click

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


def peer_environment() -> dict:
    """os.environ for the peer's process: none of the project venv's paths, and never a model hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


# --- the product: every ptbundle name bench/ uses -----------------------------------------

# common.<name> is the product's module:attribute, imported on first use (PEP 562 __getattr__ below),
# so a rename in the product is one edit here and importing this module imports no ptbundle.
PRODUCT = {
    "load_tokenizer": "ptbundle.runtime.text:load_tokenizer", "encode": "ptbundle.runtime.text:encode",
    "pad": "ptbundle.runtime.text:pad", "batch_indices": "ptbundle.runtime.text:batch_indices",
    "TEXT_MODULE_FILE": "ptbundle.runtime.text:__file__",  # the peer loads runtime/text.py by path
    "open_bundle": "ptbundle.runtime:Bundle.load", "Manifest": "ptbundle.runtime:Manifest",
    "load_mr": "ptbundle.runtime.data:load_mr", "load_files": "ptbundle.runtime.data:load_files",
    "read_examples": "ptbundle.runtime.data:read_examples", "Columns": "ptbundle.runtime.data:Columns",
    "metrics": "ptbundle.runtime.metrics:classification_metrics",
    "Template": "ptbundle.runtime.template:Template",
    "sha256_file": "ptbundle.runtime.format:sha256_file",
    "PROMPT_FILE": "ptbundle.runtime.format:PROMPT", "TOKENIZER_FILE": "ptbundle.runtime.format:TOKENIZER",
    "TRAINING_LOG_FILE": "ptbundle.runtime.format:TRAINING_LOG",
    "cpu_threads": "ptbundle.runtime.onnx_backend:default_threads",  # the thread count onnxruntime gets
    "session_options": "ptbundle.runtime.onnx_backend:session_options",  # how the runtime runs a graph
    "OnnxModel": "ptbundle.runtime.onnx_backend:OnnxModel", "batched_logits": "ptbundle.runtime.bundle:batched_logits",
    # bench/experiments/int8_choice.py builds the candidates from the exporter's own steps
    "quantize_int8": "ptbundle.builder.lab:quantize_int8",
    "quantize_weights": "ptbundle.builder.lab:quantize_weights",
    "blockwise_weights": "ptbundle.builder.lab:blockwise_weights",
    "quantize_decoder": "ptbundle.builder.lab:quantize_decoder",
    "DecoderSession": "ptbundle.runtime.generate:DecoderSession",  # how the runtime runs a decoder graph
    "fix_activation_scales": "ptbundle.builder.lab:fix_activation_scales",
    "calibration_sample": "ptbundle.builder.lab:calibration_sample",
    "calibration_batches": "ptbundle.builder.lab:calibration_batches",
    "HEAD_NODES": "ptbundle.builder.lab:HEAD_NODES",
    "ENCODER_MASK_FILL": "ptbundle.builder.lab:MASK_FILL",
    "UNFUSED": "ptbundle.runtime.onnx_backend:UNFUSED",  # the fusion passes the "unfused" variant turns off
    "TUNING_BUDGETS": "ptbundle.runtime.tuning:BUDGETS",  # the token budgets runtime.tuning times
    "cpu": "ptbundle.runtime.tuning:cpu", "bf16_units": "ptbundle.runtime.tuning:bf16_units",
    "ONNX_PAD_MULTIPLE": "ptbundle.runtime.onnx_backend:OnnxModel.pad_multiple",
    "use_device": "ptbundle.builder.lab:use_device",
    "Recipe": "ptbundle.builder.lab:Recipe",
    "prepare": "ptbundle.builder.lab:prepare", "TrainStep": "ptbundle.builder.lab:TrainStep",
    "bucketed_batches": "ptbundle.builder.lab:bucketed_batches",
    "lr_schedule": "ptbundle.builder.lab:lr_schedule",
    "TRAIN_PAD_MULTIPLE": "ptbundle.builder.lab:TRAIN_PAD_MULTIPLE",
    "FeatureCache": "ptbundle.builder.lab:FeatureCache", "Verbalizer": "ptbundle.builder.lab:Verbalizer",
    "zero_shot_head": "ptbundle.builder.lab:zero_shot_head", "head_logits": "ptbundle.builder.lab:head_logits",
    "lm_zero_shot_head": "ptbundle.builder.lab:lm_zero_shot_head", "label_rows": "ptbundle.builder.lab:label_rows",
    "MR_DECODER_TEMPLATE": "ptbundle.builder.lab:MR_DECODER_TEMPLATE",
    "load_backbone_dir": "ptbundle.builder.lab:load_backbone",
    # generation bundles (bench/perf/generate_speed.py)
    "write_generation_bundle": "ptbundle.builder.lab:write_generation_bundle",
    "backbone_info": "ptbundle.builder.lab:backbone_info",
    "PromptSpec": "ptbundle.builder.lab:PromptSpec",
    "build_lm_model": "ptbundle.builder.lab:build_lm_model",  # LMPromptModel: prompt_cache(), the reference
    "lm_reference": "ptbundle.builder.lab:lm_reference",
    "CHAT_FORMAT": "ptbundle.builder.lab:CHAT_FORMAT", "DEFAULT_INIT_TEXT": "ptbundle.builder.lab:DEFAULT_INIT_TEXT",
    "packaged_gguf": "ptbundle.builder.lab:packaged_gguf", "hf_directory": "ptbundle.builder.lab:hf_directory",
    "DecoderConfig": "ptbundle.builder.lab:DecoderConfig", "Kernels": "ptbundle.builder.lab:Kernels",
    "decoder_graph": "ptbundle.builder.lab:decoder_graph",
    # merged multi-task bundles (bench/perf/multitask_scale.py): pt-build merge and pt-build import, in-process
    "merge": "ptbundle.builder:merge", "import_adapter": "ptbundle.builder:import_adapter",
    "read_tables": "ptbundle.runtime.format:read_tables",  # a merged bundle's task tables, its graphs' inputs
    "sha256_file": "ptbundle.runtime.format:sha256_file",
    "PROMPT_FILE": "ptbundle.runtime.format:PROMPT", "MANIFEST_FILE": "ptbundle.runtime.format:MANIFEST",
    "adapter_labels": "ptbundle.runtime.adapter:default_labels",  # what a served PEFT adapter's labels are called
    "is_adapter": "ptbundle.runtime.adapter:is_adapter",
}


def product(name: str):
    import importlib

    module, _, path = PRODUCT[name].partition(":")
    value = importlib.import_module(module)
    for part in path.split("."):
        value = getattr(value, part)
    return value


def __getattr__(name: str):
    if name not in PRODUCT:
        raise AttributeError(f"module 'common' has no attribute {name!r}")
    return product(name)


def load_backbone(path=None):
    """ptbundle's Backbone (None: the shipped all-MiniLM-L6-v2), with MindSpore in graph mode on CPU."""
    product("use_device")("CPU")
    return product("load_backbone_dir")(path)


def recipe(**fields):
    """The default recipe with `fields` changed (None: the default)."""
    return product("Recipe")(**{k: v for k, v in fields.items() if v is not None})


def load_data(spec: str, columns=None):
    """--data as a Dataset: as pt-build export reads --data mr / --train --dev --test, and pt-run eval a file."""
    columns = columns or product("Columns")()
    if spec == "mr":
        return product("load_mr")()
    path = Path(spec)
    if path.is_dir():
        files = {split: next((f for f in (path / f"{split}{ext}" for ext in (".tsv", ".csv", ".jsonl"))
                              if f.is_file()), None) for split in ("train", "dev", "test")}
        if not (files["train"] and files["dev"]):
            raise SystemExit(f"--data {spec}: a data directory needs train and dev files (.tsv, .csv or .jsonl)")
        return product("load_files")(files["train"], files["dev"], files["test"], columns)
    if path.is_file():
        return product("load_files")(path, path, path, columns)
    raise SystemExit(f"--data {spec!r}: not 'mr', a directory or a file")


def eval_split(dataset) -> tuple:
    """(name, examples) the speed and accuracy figures run on: test, or dev when there is no test."""
    return ("test", dataset.test) if dataset.test else ("dev", dataset.dev)


def split_texts(examples) -> tuple:
    """(texts, second texts or None) of examples."""
    texts_b = [e.text_b for e in examples] if any(e.text_b is not None for e in examples) else None
    return [e.text for e in examples], texts_b


def read_manifest(path) -> dict:
    """A single-task bundle's manifest.json, validated, as one dict: the bundle's fields and its task's
    (plus kind_label: 'soft', 'hard probe'...)."""
    manifest = product("Manifest").read(Path(path))
    fields = {k: v for k, v in manifest.to_json().items() if k != "tasks"}
    return dict(fields, **manifest.only.to_json(), kind_label=manifest.kind_label)


def check_backbone(manifest: dict, backbone) -> None:
    """With --backbone given, the bundle must contain it (same model.safetensors), or its figures mix two models."""
    if backbone is not None and product("sha256_file")(Path(backbone) / "model.safetensors") \
            != manifest["backbone"]["sha256"]:
        raise SystemExit(f"--backbone {backbone}: not the backbone of the bundle ({manifest['backbone']['name']})")


def epoch_batches(lengths, batch_size: int, seed: int, epochs: int = 1) -> list:
    """The training batches of each epoch as builder.train makes them (one RandomState(seed) for all epochs)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    return [product("bucketed_batches")(lengths, batch_size, rng) for _ in range(epochs)]
