"""The generation peers: PyTorch + transformers + PEFT eager `generate`, and llama.cpp (llama-cpp-python), on CPU.

Runs in bench/.peer-venv (torch, transformers, peft, safetensors, numpy;
llama-cpp-python when it is installed there), never with ptbundle or
MindSpore, as a worker of bench/perf/generate_speed.py:

    bench/.peer-venv/bin/python bench/peer/peer_generate.py --data DIR/peer.json [--smoke]

It reads its inputs from the --data file, which generate_speed.py writes
with our code: the backbone directory (Hugging Face layout), the GGUF file
it was converted from (or null), the soft prompt's values
(`prompt_embeddings` [P, hidden] in a safetensors file, PEFT's name), the
prompts as token ids (tokenized by our runtime through the chat template:
both sides run the same ids), eos and pad ids, the thread count.  Then it
answers one JSON line on stdout per JSON line on stdin, so that the caller
can interleave its calls with its own contenders' (everything the libraries
print goes to stderr):

    {"cmd": "speed", "who": "peft" | "plain" | "llamacpp", "prompt": i, "new_tokens": N}
        -> {"ttft": s, "decode": s or null, "tokens": [...]}
    {"cmd": "parity", "prompt": i, "new_tokens": N}
        -> {"tokens": [...], "top2": [[id1, logit1, id2, logit2] per step]}
    {"cmd": "quit"}

The first line it writes says what it loaded: {"ready": true, "versions":
{...}, "attn_implementation": ..., "llamacpp": {...} or {"skipped": why}}.

- peft: LlamaForCausalLM (float32, eager PyTorch, the attention
  transformers picks by default) under PEFT PromptTuningConfig(task_type=
  CAUSAL_LM, num_virtual_tokens=P) whose embedding is the --data prompt's
  values; `generate` greedy (do_sample=False), max_new_tokens = min_new_tokens
  = N (eos suppressed, so exactly N tokens), under torch.inference_mode,
  torch.set_num_threads(threads).  PEFT puts the P vectors in front of the
  text's embeddings at every prefill: positions 0..P-1, the text from P on,
  as our bundle's prompt cache does.
- plain: the same model without the prompt, one new token only: its time to
  first token beside PEFT's shows what the prompt costs at serve time there.
- llamacpp: llama.cpp on the GGUF file itself (Q4_1 weights: quantized, not
  the float32 weights the others run), the plain model (it cannot take a
  soft prompt), `Llama.generate` greedy (temp 0), n_threads = n_threads_batch
  = threads, KV cache reset before each prompt (no prefix reuse), stopped
  after N tokens (generate does not stop at eos).
Times: time to first token = from the call to the first new token in hand
(the prefill and the choice of the token; for transformers, timed by a
streamer, which generate hands each new token as it is chosen); decode =
from the first new token to the N-th (N - 1 decode steps).

parity: `generate` greedy with PEFT's prompt, stopping at eos (the product's
behaviour), output_logits=True: the new tokens (eos included when it
stopped there) and every step's two largest raw logits.

--smoke: never loads llama.cpp (bench/perf/generate_speed.py --smoke uses the tiny test Llama).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the backbone is a local directory
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PromptTuningConfig, TaskType, get_peft_model  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402


class Clock(BaseStreamer):
    """Timestamps of generate's streamer calls: the prompt first, then each new token as it is chosen."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class Peers:
    def __init__(self, data: dict, smoke: bool):
        self.data = data
        torch.set_num_threads(data["threads"])
        self.base = AutoModelForCausalLM.from_pretrained(data["backbone"], dtype=torch.float32)
        self.base.eval()
        self.attn_implementation = self.base.config._attn_implementation
        p = data["virtual_tokens"]
        self.peft = get_peft_model(self.base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p))
        table = load_file(data["embeddings"])["prompt_embeddings"]
        with torch.no_grad():
            weight = self.peft.prompt_encoder["default"].embedding.weight
            if tuple(weight.shape) != table.shape:
                raise SystemExit(f"PEFT's prompt is {tuple(weight.shape)}, the bundle's {table.shape}")
            weight.copy_(torch.from_numpy(table))
        self.peft.eval()
        self.eos = list(data["eos_token_ids"])
        self.pad = data["pad_token_id"]
        self.llama, self.llamacpp = None, None
        if smoke:
            self.llamacpp = {"skipped": "--smoke: llama.cpp is not run"}
        elif not data.get("gguf"):
            self.llamacpp = {"skipped": "the backbone has no GGUF file to give llama.cpp"}
        elif data.get("no_llamacpp"):
            self.llamacpp = {"skipped": "--no-llamacpp"}
        else:
            try:
                import llama_cpp
            except ImportError as e:
                self.llamacpp = {"skipped": f"llama-cpp-python is not installed in {sys.prefix} ({e})"}
            else:
                self.llama = llama_cpp.Llama(model_path=data["gguf"], n_ctx=data.get("context", 512),
                                             n_threads=data["threads"], n_threads_batch=data["threads"],
                                             verbose=False, seed=0)
                self.llamacpp = {"version": llama_cpp.__version__, "gguf": data["gguf"],
                                 "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}

    def inputs(self, i: int):
        ids = torch.tensor([self.data["prompts"][i]], dtype=torch.long)
        return ids, torch.ones_like(ids)

    def speed(self, who: str, i: int, n: int) -> dict:
        if who == "llamacpp":
            return self.speed_llamacpp(i, n)
        model = self.peft if who == "peft" else self.base
        n = n if who == "peft" else 1
        ids, mask = self.inputs(i)
        clock = Clock()
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=self.pad, eos_token_id=self.eos, streamer=clock)
        new = out[0, ids.shape[1]:].tolist()
        times = clock.times[1:]  # the first put is the prompt
        if len(new) != n or len(times) != n:
            raise SystemExit(f"generate gave {len(new)} tokens ({len(times)} streamed), not {n}")
        return {"ttft": times[0] - start, "decode": times[-1] - times[0] if n > 1 else None, "tokens": new}

    def speed_llamacpp(self, i: int, n: int) -> dict:
        if self.llama is None:
            raise SystemExit(f"llama.cpp is not loaded: {self.llamacpp.get('skipped')}")
        self.llama.reset()  # no reuse of the previous call's cache for a shared prefix
        tokens, times = [], []
        start = time.perf_counter()
        for token in self.llama.generate(self.data["prompts"][i], temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                         repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == n:
                break
        return {"ttft": times[0] - start, "decode": times[-1] - times[0] if n > 1 else None, "tokens": tokens}

    def parity(self, i: int, n: int) -> dict:
        ids, mask = self.inputs(i)
        with torch.inference_mode():
            out = self.peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                     pad_token_id=self.pad, eos_token_id=self.eos, output_logits=True,
                                     return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:].tolist()
        top2 = []
        for step in out.logits:
            values, index = torch.topk(step[0].float(), 2)
            top2.append([int(index[0]), float(values[0]), int(index[1]), float(values[1])])
        return {"tokens": new, "top2": top2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the inputs, written by bench/perf/generate_speed.py")
    ap.add_argument("--smoke", action="store_true", help="never load llama.cpp")
    args = ap.parse_args()
    # Replies go to the real stdout; anything a library prints goes to stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    with open(args.data) as f:
        data = json.load(f)
    peers = Peers(data, args.smoke)
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "numpy": np.__version__, "torch_threads": torch.get_num_threads()}
    replies.write(json.dumps({"ready": True, "versions": versions, "attn_implementation": peers.attn_implementation,
                              "llamacpp": peers.llamacpp}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "speed":
            reply = peers.speed(cmd["who"], cmd["prompt"], cmd["new_tokens"])
        elif cmd["cmd"] == "parity":
            reply = peers.parity(cmd["prompt"], cmd["new_tokens"])
        else:
            raise SystemExit(f"unknown command {cmd['cmd']!r}")
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
