"""The peer: the same models and recipe in PyTorch + transformers + PEFT, on CPU.

Runs in its own environment (bench/.peer-venv: torch, transformers, peft,
tokenizers, safetensors, numpy), never with ptbundle or MindSpore:

    bench/.peer-venv/bin/python bench/peer/peer_torch.py --data bench/results/peer-inputs [--peers course,same] [--smoke]

bench/run.py writes the inputs (bench/peer/peer_inputs.py: sentences,
batches, learning rates, initial prompt and head, the peers and their
weights) and runs this.  Tokenizing, batching in length order and padding
are the project's own: runtime/text.py, loaded by path (it needs only numpy
and tokenizers); figures are summarized by bench/common.py (standard library
only).

The model (PeerModel): PEFT over AutoModel with
task_type=FEATURE_EXTRACTION, mean pooling over the text tokens, a linear
head.  Prompt tuning (PromptTuningConfig) puts the virtual tokens before
[CLS] and the mask gets a prefix of ones, as tests/fixtures/make_reference.py
checks ours against; prefix tuning (PrefixTuningConfig) puts P keys and
values in front of every layer's own, the mask gets P ones and the text's
positions start at P (tests/fixtures/make_prefix_reference.py); its table
is PEFT's `prompt_embeddings` [P, layers * 2 * hidden], the bundle's.  For
inference PEFT runs in inference mode, where the table is the embedding
weight (a reparameterized prefix is folded into it, as PEFT saves it).
Dropout is off, as in our encoder (which has none); the checkpoint's unused
pooler is not built.  Eager PyTorch (no torch.compile), the attention
implementation transformers picks by default (recorded), float32,
torch.set_num_threads(--threads).

The peers (data.json's "peers", made by peer_inputs.py):
- same: the bundle's method and weights (prompt tuning, or prefix tuning
  from layer 0); its logits on a few sentences are compared with the
  bundle's (onnxruntime, computed by peer_inputs.py): max abs difference;
- course: the course recipe's model, PEFT prompt tuning with 20 virtual
  tokens, with the weights of a shallow prompt-tuning bundle if one was
  given (then its logits are checked too), else PEFT's and torch's random
  initialization (seed 0): its speed is the same, its accuracy is chance.
A peer whose method, length and weights equal an earlier one's is measured
once.

Measures, with min/median/max over repeats:
- gemm: torch.matmul GFLOP/s at a layer's four GEMM shapes (as perf/roofline.py);
- inference, per peer: sentences/s at each batch size, sorted-length
  batching on and off, on the same sentences and with the same padding as
  perf/inference.py (the onnxruntime backend's multiple), tokenization to
  labels included, under torch.inference_mode; the accuracy of the last
  pass checks it is the same model;
- training: seconds per step at the recipe's batch size on the same batches
  in the same order as builder.train (padded to its multiple), from our
  initial prompt and head, in the recipe's method (skipped, saying why,
  when PEFT has no equivalent): AdamW (torch's; eps 1e-6 as MindSpore's
  AdamWeightDecay, which unlike torch's applies no bias correction), the
  recipe's learning rates step by step as builder.train.lr_schedule gives
  them; the first step of each shape is reported apart, as
  perf/train_step.py does.  Projected epoch = median step * steps per epoch.
  --full-epochs K trains K real epochs instead and reports dev accuracy per
  epoch and test accuracy of the best dev epoch.
Writes <results>/peer.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the backbone is a local directory
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from transformers import AutoModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common (standard library only)
from common import (every_kth, layer_gemm_shapes, no_peft_equivalent, spread, subset_name,  # noqa: E402
                    time_calls, write_results)

text = None  # runtime/text.py, loaded by main() from the path in data.json


def load_module(path: str):
    """A module of the project by its file path: ptbundle is not installed here."""
    spec = importlib.util.spec_from_file_location("ptbundle_runtime_text", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pad(encodings, pad_id: int, multiple: int):
    """(input_ids, attention_mask) as torch int64, padded by runtime.text.pad."""
    ids, mask, _ = text.pad(encodings, pad_id, multiple)
    return torch.from_numpy(ids).long(), torch.from_numpy(mask).long()


class PeerModel(torch.nn.Module):
    """PEFT prompt tuning or prefix tuning (feature extraction) + mean pooling over the text + linear head.

    inference=True builds PEFT's inference mode (a prefix is then one table, its reparameterization folded);
    `projection` is the hidden size of a prefix's reparameterization MLP while training (0: none).
    """

    def __init__(self, backbone: str, method: str, virtual_tokens: int, num_labels: int,
                 attn_implementation: str | None = None, projection: int = 0, inference: bool = False):
        super().__init__()
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        base = AutoModel.from_pretrained(backbone, add_pooling_layer=False, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, **kwargs)
        self.attn_implementation = base.config._attn_implementation
        self.method, self.virtual_tokens = method, virtual_tokens
        if method == "prompt-tuning":  # where nothing is loaded: PEFT's init closest to ours (sampled tokens)
            config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=virtual_tokens,
                                        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, inference_mode=inference)
        elif method == "prefix-tuning":
            config = PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=virtual_tokens,
                                        prefix_projection=projection > 0,
                                        encoder_hidden_size=projection or base.config.hidden_size,
                                        inference_mode=inference)
        else:
            raise ValueError(f"{method}: PEFT has no such prompt method")
        # last_hidden_state holds prompt tuning's virtual tokens before the text; a prefix adds keys and values only
        self.text_start = virtual_tokens if method == "prompt-tuning" else 0
        self.peft = get_peft_model(base, config)
        self.head = torch.nn.Linear(base.config.hidden_size, num_labels)

    def weights(self) -> dict:
        """ptbundle's parameter names (prompt.safetensors, init.npz) -> this model's tensors."""
        encoder = self.peft.prompt_encoder["default"]
        if hasattr(encoder, "transform"):  # a prefix's reparameterization, while training
            names = {"prefix.embedding": "embedding.weight", "prefix.up.weight": "transform.0.weight",
                     "prefix.up.bias": "transform.0.bias", "prefix.down.weight": "transform.2.weight",
                     "prefix.down.bias": "transform.2.bias"}
        else:
            names = {"prompt_embeddings": "embedding.weight"}
        own = dict(encoder.named_parameters())
        return {**{ours: own[theirs] for ours, theirs in names.items()},
                "classifier.weight": self.head.weight, "classifier.bias": self.head.bias}

    def prompt_parameters(self) -> list:
        return [t for name, t in self.weights().items() if not name.startswith("classifier.")]

    def load(self, values: dict) -> None:
        """Every tensor of `values` (ptbundle's names, numpy) into its place."""
        targets = self.weights()
        for name, value in values.items():
            if name not in targets:
                raise SystemExit(f"{name}: not a weight of this {self.method} model ({', '.join(targets)})")
            value = torch.from_numpy(np.asarray(value, np.float32))
            if value.shape != targets[name].shape:
                raise SystemExit(f"{name}: shape {tuple(value.shape)}, the model's is {tuple(targets[name].shape)}")
            with torch.no_grad():
                targets[name].copy_(value)

    def state(self) -> dict:
        return {name: t.detach().numpy().copy() for name, t in self.weights().items()}

    def forward(self, ids, mask):
        hidden = self.peft(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(mean_pool(hidden[:, self.text_start :], mask))


def mean_pool(hidden, mask):
    """The mean of the rows the mask keeps (our MeanPooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


# --- GEMM ---------------------------------------------------------------------------

def gemm(tokens: int, hidden: int, intermediate: int, repeats: int, min_seconds: float) -> dict:
    """torch.matmul GFLOP/s at the four GEMM shapes of a layer (perf/roofline.py's method)."""
    shapes, total_flops, total_seconds = {}, 0, 0.0
    for name, m, k, n in layer_gemm_shapes(tokens, hidden, intermediate):
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        out = torch.empty(m, n)
        seconds = time_calls(lambda: torch.matmul(a, b, out=out), lambda _: None, repeats, min_seconds)
        flops = 2 * m * k * n
        shapes[name] = {"m": m, "k": k, "n": n, "gflops": spread([flops / s / 1e9 for s in seconds], 1),
                        "ms_per_call": spread([s * 1e3 for s in seconds], 3)}
        total_flops += flops
        total_seconds += statistics.median(seconds)
    return {"tokens": tokens, "repeats": repeats, "shapes": shapes,
            "layer_gflops": round(total_flops / total_seconds / 1e9, 1)}


# --- inference -----------------------------------------------------------------------

def logits(model, tokenizer, texts, data: dict, batch_size: int = 64, sort: bool = True) -> np.ndarray:
    """[texts, labels] in input order: tokenize, batch (sorted by length or not), pad, run."""
    encodings = text.encode(tokenizer, texts)
    out = np.zeros((len(encodings), len(data["labels"])), np.float32)
    with torch.inference_mode():
        for index in text.batch_indices([len(e.ids) for e in encodings], batch_size, sort):
            out[index] = model(*pad([encodings[i] for i in index], data["pad_id"], data["infer_pad_multiple"])).numpy()
    return out


def predict(model, tokenizer, texts, data: dict, batch_size: int, sort: bool) -> list:
    """Labels in input order, through a softmax as Bundle.predict makes them."""
    probs = torch.softmax(torch.from_numpy(logits(model, tokenizer, texts, data, batch_size, sort)), -1).numpy()
    return [data["labels"][i] for i in probs.argmax(-1)]


def throughput(model, tokenizer, texts, gold, data, batch_size, sort, repeats, subset) -> dict:
    predict(model, tokenizer, texts[: batch_size * 2], data, batch_size, sort)  # warm-up
    seconds, predicted = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        predicted = predict(model, tokenizer, texts, data, batch_size, sort)
        seconds.append(time.perf_counter() - t)
    return {"batch_size": batch_size, "sorted": sort, "sentences": len(texts), "subset": subset,
            "sentences_per_second": spread([len(texts) / s for s in seconds], 2),
            "accuracy": round(float(np.mean([p == g for p, g in zip(predicted, gold)])), 4)}


def describe(spec: dict) -> dict:
    """What a peer is, for the results (peer_inputs.py's spec, less its check data)."""
    return {k: spec[k] for k in ("label", "method", "virtual_tokens", "projection", "weights", "source")}


def peer_inference(name: str, spec: dict, args, data: dict, tokenizer) -> dict:
    """One peer: its logits against the bundle's (when it runs a bundle's weights), then its throughput rows."""
    torch.manual_seed(0)  # a peer without weights runs PEFT's and torch's initialization, the same in every run
    model = PeerModel(data["backbone"], spec["method"], spec["virtual_tokens"], len(data["labels"]),
                      args.attn_implementation, spec["projection"], inference=True)
    if spec["weights"]:
        model.load(load_file(spec["weights"]))
    model.eval()
    result = dict(describe(spec), attn_implementation=model.attn_implementation)
    check = spec.get("check")
    if check:
        diff = float(np.abs(logits(model, tokenizer, check["texts"], data) - np.array(check["logits"])).max())
        result["logit_check"] = {"sentences": len(check["texts"]), "max_abs_diff": diff, "reference": check["reference"]}
        print(f"peer {name} ({spec['label']}): logits on {len(check['texts'])} sentences against "
              f"{check['reference']}: max abs difference {diff:.2e}", flush=True)
    texts, gold = data["test"]["texts"], data["test"]["labels"]
    rows = []
    for size in [int(x) for x in args.batch_sizes.split(",") if x.strip()]:
        k = args.every_batch1 if size == 1 else args.every
        for sort in ([True, False] if args.sorting == "both" else [args.sorting == "on"]) if size > 1 else [True]:
            row = throughput(model, tokenizer, every_kth(texts, k), every_kth(gold, k), data, size,
                             sort, args.repeats, subset_name(len(texts), k))
            rows.append(row)
            r = row["sentences_per_second"]
            print(f"torch eager fp32 {name:<6} batch {size:>3} sorted {'on ' if sort else 'off'} {row['sentences']:>5} "
                  f"sentences: {r['median']:.1f}/s [{r['min']:.1f}-{r['max']:.1f}] acc {row['accuracy']:.4f}",
                  flush=True)
    result["inference"] = rows
    return result


def inference(args, data: dict, tokenizer) -> dict:
    """name -> result of every peer asked for; a skipped peer keeps its reason, a repeated one is measured once."""
    names = [n for n in (args.peers or ",".join(data["peers"])).split(",") if n]
    unknown = [n for n in names if n not in data["peers"]]
    if unknown:
        raise SystemExit(f"--peers {','.join(unknown)}: {args.data} has peers {', '.join(data['peers'])}")
    results, measured = {}, {}
    for name in names:
        spec = data["peers"][name]
        if "skipped" in spec:
            print(f"peer {name} skipped: {spec['skipped']}", flush=True)
            results[name] = spec
            continue
        key = json.dumps([spec[k] for k in ("method", "virtual_tokens", "projection", "weights")])
        if key in measured:  # the same model: its figures once
            print(f"peer {name} is peer {measured[key]}'s model: measured once", flush=True)
            results[name] = dict(results[measured[key]], **describe(spec), measured_as=measured[key])
            continue
        measured[key] = name
        results[name] = peer_inference(name, spec, args, data, tokenizer)
    return results


# --- training ------------------------------------------------------------------------

class Trainer:
    """The recipe's optimizer and schedule over the prompt and the head; the backbone stays frozen."""

    def __init__(self, model: PeerModel, recipe: dict, schedules: dict):
        """schedules: the head's and the prompt's learning rate at every step (builder.train.lr_schedule's)."""
        self.model = model
        self.optimizer = torch.optim.AdamW(
            [{"params": list(model.head.parameters()), "weight_decay": recipe["weight_decay"]},
             {"params": model.prompt_parameters(), "weight_decay": 0.0}],
            lr=recipe["head_lr"], betas=(0.9, 0.999), eps=1e-6)
        self.schedules = [schedules["head"], schedules["prompt"]]
        self.step_index = 0

    def step(self, ids, mask, y) -> float:
        for group, schedule in zip(self.optimizer.param_groups, self.schedules):
            group["lr"] = schedule[min(self.step_index, len(schedule) - 1)]
        self.step_index += 1
        loss = torch.nn.functional.cross_entropy(self.model(ids, mask), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def frozen_check(model: PeerModel) -> int:
    """Trainable parameter count; only the prompt and the head may train."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("prompt_encoder" in n or n.startswith("head.") for n in trainable), trainable
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_steps(trainer: Trainer, encodings, y, batches, data: dict, limit: int | None = None) -> dict:
    """Train on `batches`; seconds per step, the first step of each padded shape apart."""
    trainer.model.train()
    seen_shapes, first, seconds, losses = set(), [], [], []
    for index in batches:
        ids, mask = pad([encodings[i] for i in index], data["pad_id"], data["train_pad_multiple"])
        t = time.perf_counter()
        losses.append(trainer.step(ids, mask, torch.from_numpy(y[index])))
        elapsed = time.perf_counter() - t
        if ids.shape in seen_shapes:
            seconds.append(elapsed)
        else:
            seen_shapes.add(ids.shape)
            first.append(elapsed)
        if limit is not None and len(seconds) >= limit:
            break
    return {"seconds": seconds, "first_step_per_shape_seconds": [round(s, 3) for s in first],
            "mean_loss": float(np.mean(losses))}


def accuracy(model, tokenizer, split: dict, data: dict) -> float:
    """Accuracy on a split (texts and labels), batch 64 in length order."""
    model.eval()
    predicted = predict(model, tokenizer, split["texts"], data, 64, True)
    return round(float(np.mean([p == g for p, g in zip(predicted, split["labels"])])), 4)


def train_labels(data: dict, tokenizer) -> tuple:
    """(encodings, label ids) of the training texts."""
    labels = data["labels"]
    return (text.encode(tokenizer, data["train"]["texts"]),
            np.array([labels.index(label) for label in data["train"]["labels"]], np.int64))


def recipe_model(data: dict, attn_implementation: str | None) -> PeerModel:
    """The recipe's method and length, to train (no weights loaded)."""
    recipe = data["recipe"]
    return PeerModel(data["backbone"], recipe["method"], recipe["virtual_tokens"], len(data["labels"]),
                     attn_implementation, recipe["prefix_projection"])


def training(args, data, tokenizer, init) -> dict:
    recipe = data["recipe"]
    reason = no_peft_equivalent(recipe["method"], recipe["layer"], recipe["pooling"])
    if reason:
        return {"skipped": reason}
    encodings, y = train_labels(data, tokenizer)
    model = recipe_model(data, args.attn_implementation)
    model.load(init)
    trainable = frozen_check(model)
    epochs = args.full_epochs or 1
    if epochs > len(data["train_batches"]):
        raise SystemExit(f"--full-epochs {epochs}: the data file has batches for {len(data['train_batches'])} epochs")
    trainer = Trainer(model, recipe, data["lr_schedules"][str(epochs)])
    steps_per_epoch = len(data["train_batches"][0])
    result = {"batch_size": recipe["batch_size"], "method": recipe["method"],
              "virtual_tokens": recipe["virtual_tokens"], "recipe": recipe,
              "pad_multiple": data["train_pad_multiple"], "trainable_parameters": trainable,
              "steps_per_epoch": steps_per_epoch,
              "optimizer": "torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-6), bias-corrected"}
    if not args.full_epochs:
        run = run_steps(trainer, encodings, y, data["train_batches"][0], data, args.train_steps)
        seconds = run["seconds"]
    else:
        curve, best, seconds = [], None, []
        for epoch in range(epochs):
            t = time.perf_counter()
            run = run_steps(trainer, encodings, y, data["train_batches"][epoch], data)
            epoch_seconds = time.perf_counter() - t
            seconds += run["seconds"] if epoch == 0 else []
            dev = accuracy(model, tokenizer, data["dev"], data)
            curve.append({"epoch": epoch + 1, "train_loss": round(run["mean_loss"], 4), "dev_accuracy": dev,
                          "seconds": round(epoch_seconds, 1)})
            print(f"peer epoch {epoch + 1}: loss {run['mean_loss']:.4f} dev {dev:.4f} ({epoch_seconds:.0f} s)",
                  flush=True)
            if best is None or dev > best[1]:
                best = (epoch + 1, dev, model.state())
        model.load(best[2])
        result.update({"curve": curve, "best_epoch": best[0], "dev_accuracy": best[1],
                       "test_accuracy": accuracy(model, tokenizer, data["test"], data),
                       "epoch_seconds": spread([c["seconds"] for c in curve], 1)})
    median = statistics.median(seconds)
    result.update({"steps": len(seconds), "seconds_per_step": spread(seconds),
                   "first_step_per_shape_seconds": run["first_step_per_shape_seconds"],
                   "projected_epoch_seconds": round(median * steps_per_epoch, 1),
                   "projected_epoch_seconds_range": {k: round(v * steps_per_epoch, 1)
                                                     for k, v in spread(seconds).items()}})
    return result


# --- main ------------------------------------------------------------------------------

def arguments(description: str) -> argparse.ArgumentParser:
    """The options every peer script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", required=True, help="directory bench/peer/peer_inputs.py wrote (data.json, init.npz)")
    p.add_argument("--backbone", default=None, help="backbone directory [default: the one in data.json]")
    p.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "results"),
                   help="directory that receives the results JSON")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a few sentences and steps, one repeat")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--attn-implementation", default=None, help="eager, sdpa [default: transformers' choice]")
    return p


def setup(args) -> tuple:
    """(data.json with --backbone, the bundle's tokenizer); torch's threads and seed set, the libraries quiet,
    runtime/text.py loaded."""
    global text
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices inside transformers/peft
    data = json.loads((Path(args.data) / "data.json").read_text())
    if args.backbone:
        data["backbone"] = args.backbone
    text = load_module(data["text_module"])
    return data, text.load_tokenizer(data["tokenizer"], data["recipe"]["max_length"])


def environment() -> dict:
    """Library versions and threads, for the results."""
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "tokenizers": tokenizers.__version__, "numpy": np.__version__},
            "threads": {"torch_num_threads": torch.get_num_threads(),
                        "torch_interop_threads": torch.get_num_interop_threads()},
            "torch_parallel_info": torch.__config__.parallel_info()}


def main():
    p = arguments(__doc__.split("\n")[0])
    p.add_argument("--peers", default=None, help="comma list of data.json's peers to run (course, same) [default: all]")
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--sorting", choices=["both", "on", "off"], default="both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--every-batch1", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--full-epochs", type=int, default=0, help="train K real epochs (slow) instead of --train-steps")
    p.add_argument("--gemm-tokens", type=int, default=64 * 48)
    p.add_argument("--gemm-repeats", type=int, default=20)
    p.add_argument("--skip", default="", help="comma list of parts to skip: gemm, inference, training")
    args = p.parse_args()
    min_seconds = 0.05
    if args.smoke:
        args.batch_sizes, args.repeats, args.every, args.every_batch1 = "1,8", 1, 1, 1
        args.train_steps, args.full_epochs, args.gemm_repeats, min_seconds = 2, 0, 1, 0.005

    data, tokenizer = setup(args)
    if args.smoke:
        data["test"] = {k: v[:32] for k, v in data["test"].items()}
    skip = set(filter(None, args.skip.split(",")))
    config = json.loads((Path(data["backbone"]) / "config.json").read_text())
    result = dict(environment(), smoke=args.smoke, backbone=data["backbone"])
    started = time.perf_counter()

    if "gemm" not in skip:
        result["gemm"] = gemm(args.gemm_tokens, config["hidden_size"], config["intermediate_size"], args.gemm_repeats,
                              min_seconds)
        print(f"torch GEMM layer rate {result['gemm']['layer_gflops']:.1f} GFLOP/s", flush=True)

    if "inference" not in skip:
        result["peers"] = inference(args, data, tokenizer)

    if "training" not in skip:
        result["training"] = t = training(args, data, tokenizer, dict(np.load(Path(args.data) / "init.npz")))
        if "skipped" in t:
            print(f"torch training skipped: {t['skipped']}", flush=True)
        else:
            s = t["seconds_per_step"]
            print(f"torch train step batch {t['batch_size']} ({t['method']}): median {s['median']:.3f} s "
                  f"[{s['min']:.3f}-{s['max']:.3f}] over {t['steps']} steps; epoch of {t['steps_per_epoch']} steps "
                  f"~{t['projected_epoch_seconds']:.0f} s", flush=True)

    result["seconds"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    write_results(args.results, "peer", result)


if __name__ == "__main__":
    main()
