"""Generation bundles: the decoder graph against a reference, the KV cache, generate, pt-run generate, errors.

Every test runs on each family (Llama, and Qwen2 with its q/k/v biases).  The reference is
tests/fixtures/{llama,qwen2}_reference.npz (transformers + PEFT, see make_*_reference.py) when
it is there, else `llama_forward` below: a plain numpy Llama (RMSNorm, rotate_half rotary, grouped-query
attention by repeating kv heads, SwiGLU) in float64.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpoints import FIXTURES, write_llama_checkpoint, write_qwen2_checkpoint

BIN = Path(sys.executable).parent
P = 5
CAPACITY = 64  # decoder.mindir's static cache in the test bundles: a quarter of the tiny model's 256 positions
CHAT = "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def llama_forward(w, cfg, ids, mask, prompt_cache=None):
    """Logits [batch, seq, vocab] at every text position (float64); the prompt cache's P positions in front."""
    w = {k.removeprefix("model."): np.asarray(v, np.float64) for k, v in w.items()}
    b, s = ids.shape
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = 0 if prompt_cache is None else prompt_cache["key.0"].shape[1]
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2) / d))
    angles = (p + np.arange(s))[:, None] * inv_freq[None]
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    rotate_half = lambda x: np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)  # noqa: E731
    rms = lambda x, g: x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * g  # noqa: E731
    keys_mask = np.concatenate([np.ones((b, p)), mask], 1).astype(bool)
    causal = np.arange(p + s)[None, :] <= (p + np.arange(s))[:, None]
    visible = causal[None, None] & keys_mask[:, None, None, :]
    x = w["embed_tokens.weight"][ids]
    for i in range(cfg.num_layers):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        h = rms(x, w[f"layers.{i}.input_layernorm.weight"])
        split = lambda name, n: (h @ w[a + name + ".weight"].T + w.get(a + name + ".bias", 0)  # noqa: E731  (Qwen2's)
                                 ).reshape(b, s, n, d).transpose(0, 2, 1, 3)
        q, k, v = split("q_proj", heads), split("k_proj", kv), split("v_proj", kv)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if p:
            k = np.concatenate([np.broadcast_to(prompt_cache[f"key.{i}"], (b, kv, p, d)), k], 2)
            v = np.concatenate([np.broadcast_to(prompt_cache[f"value.{i}"], (b, kv, p, d)), v], 2)
        k, v = np.repeat(k, heads // kv, 1), np.repeat(v, heads // kv, 1)
        scores = np.where(visible, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, heads * d) @ w[a + "o_proj.weight"].T
        h = rms(x, w[f"layers.{i}.post_attention_layernorm.weight"])
        gate = h @ w[m + "gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[m + "up_proj.weight"].T)) @ w[m + "down_proj.weight"].T
    x = rms(x, w["norm.weight"])
    return x @ (w["embed_tokens.weight"] if cfg.tie_embeddings else w["lm_head.weight"]).T


def prefix_cache(table: np.ndarray, cfg) -> dict:
    """PEFT's prefix table [P, layers * 2 * kv_width] as a prompt cache (make_llama_reference.py, semantics a)."""
    kvw, out = cfg.kv_width, {}
    for i in range(cfg.num_layers):
        for slot, name in ((2 * i, f"key.{i}"), (2 * i + 1, f"value.{i}")):
            block = table[:, slot * kvw:(slot + 1) * kvw].reshape(len(table), cfg.num_kv_heads, cfg.head_dim)
            out[name] = np.ascontiguousarray(block.transpose(1, 0, 2), np.float32)
    return out


# Each family's tiny checkpoint and the reference transformers computed for it (tests/fixtures/make_*_reference.py)
MODELS = {"llama": (write_llama_checkpoint, FIXTURES / "llama_reference.npz"),
          "qwen2": (write_qwen2_checkpoint, FIXTURES / "qwen2_reference.npz")}


@pytest.fixture(scope="module", params=list(MODELS))
def lm(tmp_path_factory, request):
    """A tiny causal LM of each family: (checkpoint dir, DecoderConfig, weights, reference npz or None, prompt
    cache of P positions)."""
    from safetensors.numpy import load_file

    from ptbundle.builder.backbones.architectures import config_from, get

    writer, fixture = MODELS[request.param]
    d = writer(tmp_path_factory.mktemp(f"tiny-{request.param}"))
    raw = json.loads((d / "config.json").read_text())
    cfg = config_from(get(raw["model_type"]), raw, d / "config.json")
    weights = load_file(str(d / "model.safetensors"))
    ref = dict(np.load(fixture)) if fixture.is_file() else None
    if ref is not None:
        cache = prefix_cache(ref["prefix/prefix"], cfg)
    else:
        rng = np.random.RandomState(2)
        cache = {f"{n}.{i}": (rng.standard_normal((cfg.num_kv_heads, P, cfg.head_dim)) * 0.5).astype(np.float32)
                 for i in range(cfg.num_layers) for n in ("key", "value")}
    return d, cfg, weights, ref, cache


def backbone_info(cfg):
    from ptbundle.runtime.format import BackboneInfo

    return BackboneInfo(f"tiny-{cfg.model_type}", cfg.model_type, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                        cfg.intermediate_size, cfg.vocab_size, "0" * 64)


def write(lm, path, with_prompt: bool, template=None, quantize=False, cfg=None):
    from ptbundle.builder.bundles.generation import write_generation_bundle

    d, base_cfg, weights, _, cache = lm
    cfg = cfg or base_cfg
    cache = cache if with_prompt else None
    reference = lambda ids, mask: llama_forward(weights, cfg, ids, mask, cache)  # noqa: E731
    return write_generation_bundle(path, weights, cfg, d / "tokenizer.json", cache, name="tiny-chat",
                                   template=template, details={}, backbone=backbone_info(cfg), quantize=quantize,
                                   prompt_method="prefix-tuning" if with_prompt else "none", reference=reference,
                                   mindir_capacity=CAPACITY)


@pytest.fixture(scope="module")
def bundles(lm, tmp_path_factory):
    """{"plain": no prompt, int8 too; "prefix": the P-position prompt cache; "chat": no prompt, chat template}."""
    out = tmp_path_factory.mktemp("generation")
    write(lm, out / "plain", False, quantize=True)
    write(lm, out / "prefix", True)
    write(lm, out / "chat", False, template=CHAT)
    return out


def session_of(bundle_dir):
    from ptbundle.runtime.generate import DecoderSession, read_prompt_cache

    return DecoderSession(bundle_dir / "decoder.onnx", read_prompt_cache(bundle_dir / "prompt_cache.safetensors"))


def reference_batch(lm, case):
    """(ids, mask, logits [b, s, vocab]) of a right-padded batch, from the fixture or the numpy model."""
    _, cfg, weights, ref, cache = lm
    if ref is not None:
        ids, mask = ref["plain/input_ids"].astype(np.int64), ref["plain/attention_mask"].astype(np.int64)
        return ids, mask, ref[f"{case}/logits"]
    rng = np.random.RandomState(0)
    lengths = [13, 20, 7, 16]
    ids = np.full((4, 20), cfg.pad_token_id, np.int64)
    mask = np.zeros((4, 20), np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n], mask[r, :n] = rng.randint(3, cfg.vocab_size, n), 1
    return ids, mask, llama_forward(weights, cfg, ids, mask, cache if case == "prefix" else None)


@pytest.mark.parametrize("case", ["plain", "prefix"])
def test_graph_logits_equal_the_reference_at_every_position(lm, bundles, case):
    ids, mask, expected = reference_batch(lm, case)
    session = session_of(bundles / case)
    assert session.prompt_length == (P if case == "prefix" else 0)
    worst = 0.0
    for t in range(1, ids.shape[1] + 1):  # the graph gives each row's last attended position: cut at t
        logits, _ = session.prefill(ids[:, :t], mask[:, :t])
        last = np.maximum(mask[:, :t].sum(1) - 1, 0)
        rows = mask[:, :t].sum(1) > 0
        worst = max(worst, float(np.abs(logits[rows] - expected[rows, last[rows]]).max()))
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("case", ["plain", "prefix"])
def test_prefill_then_decode_equals_one_pass(lm, bundles, case):
    _, cfg, *_ = lm
    session = session_of(bundles / case)
    p = session.prompt_length
    rng = np.random.RandomState(5)
    ids = rng.randint(3, cfg.vocab_size, (2, 12)).astype(np.int64)
    whole, present = session.prefill(ids, np.ones_like(ids))
    assert present[0].shape == (2, cfg.num_kv_heads, p + 12, cfg.head_dim)
    logits, cache = session.prefill(ids[:, :8], np.ones((2, 8), np.int64))
    for j in range(8, 12):  # one token at a time over the growing cache
        logits, cache = session.run(ids[:, j:j + 1], np.full((2, 1), p + j), np.ones((2, p + j + 1), np.int64), cache)
    assert np.abs(logits - whole).max() <= 1e-4
    for a, b in zip(cache, present):
        assert np.abs(a - b).max() <= 1e-4


def reference_greedy(lm, case):
    """(prompts, [new token ids per prompt]) greedy, stopping at eos; from the fixture or the numpy model."""
    _, cfg, weights, ref, cache = lm
    if ref is not None:
        prompts = json.loads(str(ref["greedy/prompts"]))
        tokens, lengths = ref[f"greedy/{case}_tokens"], ref[f"greedy/{case}_lengths"]
        return prompts, [list(map(int, t[:n])) for t, n in zip(tokens, lengths)], tokens.shape[1]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(lm[0] / "tokenizer.json"))
    prompts = ["hello there", "The film was", "a", "über café ☕", "<|im_start|>user"]
    out = []
    for prompt in prompts:
        ids = tok.encode(prompt, add_special_tokens=False).ids
        new = []
        for _ in range(12):
            seq = np.array([ids + new])
            nxt = int(llama_forward(weights, cfg, seq, np.ones_like(seq), cache if case == "prefix" else None)[0, -1].argmax())
            if nxt in cfg.eos_token_ids:
                break
            new.append(nxt)
        out.append(new)
    return prompts, out, 12


@pytest.mark.parametrize("backend", ["onnxruntime", "mindspore"])
@pytest.mark.parametrize("case", ["plain", "prefix"])
def test_greedy_generate_equals_the_reference(lm, bundles, case, backend):
    from ptbundle.runtime import Bundle

    bundle = Bundle.load(bundles / case, backend=backend)
    prompts, expected, steps = reference_greedy(lm, case)
    got = [bundle.generate(p, max_new_tokens=steps).token_ids for p in prompts]
    assert got == expected


def test_sampling_is_reproducible_with_a_seed_and_differs_across_seeds(bundles):
    from ptbundle.runtime import Bundle

    bundle = Bundle.load(bundles / "prefix")
    # a high temperature: the tiny random model is very sure of itself
    run = lambda seed: bundle.generate("The film was", max_new_tokens=20, temperature=8.0, seed=seed).token_ids  # noqa: E731
    assert run(1) == run(1)
    assert len({tuple(run(s)) for s in range(4)}) > 1
    nucleus = lambda seed: bundle.generate("The film was", max_new_tokens=20, temperature=8.0, top_p=0.5,  # noqa: E731
                                           seed=seed).token_ids
    assert nucleus(3) == nucleus(3)


def test_streamed_pieces_concatenate_to_the_text(bundles):
    from ptbundle.runtime import Bundle

    bundle = Bundle.load(bundles / "prefix")
    tok = bundle.generator.tokenizer
    for seed in range(3):
        pieces = list(bundle.generate("über café", max_new_tokens=30, temperature=8.0, seed=seed, stream=True))
        seen = []
        result = bundle.generate("über café", max_new_tokens=30, temperature=8.0, seed=seed, callback=seen.append)
        assert "".join(pieces) == result.text == tok.decode(result.token_ids, skip_special_tokens=True)
        assert seen == pieces and all(pieces)


def test_pieces_never_split_a_character(lm):
    """Byte-level BPE here is one token per byte: each multi-byte character comes in several tokens."""
    from tokenizers import Tokenizer

    from ptbundle.runtime.generate import TextStream

    tok = Tokenizer.from_file(str(lm[0] / "tokenizer.json"))
    text = "über café ☕ 日本"
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(text, add_special_tokens=False).ids]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) == len(text)  # one piece per character, none split


def test_stop_strings_and_eos_stop_generation(lm, bundles, tmp_path):
    from ptbundle.runtime import Bundle

    bundle = Bundle.load(bundles / "prefix")
    # a seed whose sample runs the whole length (at this temperature eos, id 2, comes up now and then)
    seed, full = next((s, g) for s in range(50)
                      for g in [bundle.generate("The film was", max_new_tokens=30, temperature=8.0, seed=s)]
                      if g.finish_reason == "length")
    assert len(full.token_ids) == 30
    stop = full.text[len(full.text) // 2:][:2]  # a piece of text the generation will meet
    cut = bundle.generate("The film was", max_new_tokens=30, temperature=8.0, seed=seed, stop=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and full.text[len(cut.text):].startswith(stop)
    # eos: make the token the model wants first an eos id
    first = bundle.generate("hello there", max_new_tokens=3).token_ids[0]
    import dataclasses

    eos_cfg = dataclasses.replace(lm[1], eos_token_ids=(first,))
    write(lm, tmp_path / "eos", True, cfg=eos_cfg)
    stopped = Bundle.load(tmp_path / "eos").generate("hello there", max_new_tokens=3)
    assert stopped.finish_reason == "eos" and stopped.token_ids == [] and stopped.text == ""


def test_chat_template_joins_markup_and_prompt_as_tokens(lm, bundles):
    from ptbundle.runtime import Bundle

    bundle = Bundle.load(bundles / "chat")
    result = bundle.generate("hi", max_new_tokens=2)
    # special tokens 1 (<|im_start|>) and 2 (<|im_end|>); the newline kept as written; one token per byte
    tok = bundle.generator.tokenizer
    expected = [1] + tok.encode("user\n", add_special_tokens=False).ids + tok.encode("hi", add_special_tokens=False).ids \
        + [2] + tok.encode("\n", add_special_tokens=False).ids + [1] + tok.encode("assistant\n", add_special_tokens=False).ids
    assert result.prompt_ids == expected


def run(*args, stdin=b""):
    done = subprocess.run([str(BIN / "pt-run"), *map(str, args)], input=stdin, capture_output=True, timeout=300)
    return done.returncode, done.stderr.decode("utf-8", "replace"), done.stdout.decode("utf-8", "replace")


def assert_one_error_line(code, stderr, *expected):
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr
    for text in expected:
        assert text in errors[0], errors[0]


def test_pt_run_generate_prints_the_text(bundles):
    from ptbundle.runtime import Bundle

    expected = Bundle.load(bundles / "chat").generate("hello", max_new_tokens=8).text
    code, err, out = run("generate", bundles / "chat", "hello", "--max-new-tokens", 8)
    assert code == 0, err
    assert out == expected + "\n"
    code, err, out = run("generate", bundles / "chat", "-", "--max-new-tokens", 8, stdin=b"hello\n")
    assert code == 0 and out == expected + "\n", err


def test_pt_run_generate_int8(lm, bundles):
    """The int8 graph: every projection and the LM head as block-quantized MatMulNBits (the embedding table
    fp32 for its Gather), greedy ids mostly those of fp32, logits close, and a row's logits the same alone or
    in a padded batch (each row's activation scales are its own)."""
    import onnx

    from ptbundle.runtime import Bundle

    cfg = lm[1]
    graph = onnx.load(str(bundles / "plain" / "decoder.int8.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulNBits") == 4 * cfg.num_layers + 1  # qkv, o, gate_up, down per layer; the head
    assert "MatMul" not in ops and "Gemm" not in ops and "MatMulInteger" not in ops
    fp32, int8 = Bundle.load(bundles / "plain"), Bundle.load(bundles / "plain", int8=True)
    prompts = ["hello there", "The film was", "a", "über café", "123"]
    same = sum(a == b for p in prompts
               for a, b in zip(fp32.generate(p, max_new_tokens=8).token_ids, int8.generate(p, max_new_tokens=8).token_ids))
    assert same >= 0.6 * 8 * len(prompts)
    ids, mask, _ = reference_batch(lm, "plain")
    a, _ = fp32.generator.session.prefill(ids, mask)
    b, _ = int8.generator.session.prefill(ids, mask)
    assert np.abs(a - b).max() <= 0.15 * np.abs(a).max()
    alone = np.concatenate([int8.generator.session.prefill(ids[r:r + 1, :mask[r].sum()], mask[r:r + 1, :mask[r].sum()])[0]
                            for r in range(len(ids))])
    assert np.abs(alone - b).max() <= 1e-4 * np.abs(b).max()
    code, err, out = run("generate", bundles / "plain", "hello", "--max-new-tokens", 4, "--int8")
    assert code == 0 and out, err
    manifest = json.loads((bundles / "plain" / "manifest.json").read_text())
    assert manifest["export"]["onnx"] <= 1e-4 and "onnx-int8" in manifest["export"]


@pytest.mark.parametrize("bits", [8, 4])
def test_blockwise_weights_run_in_onnxruntime_as_their_dequantized_matmul(tmp_path, bits):
    """builder.quantize.blockwise_weights writes MatMulNBits that onnxruntime runs: its product equals x times
    the weights the packing describes (unpacked here independently) up to the int8 rounding of activations per
    block, an outlier weight spoils only its own block's scale, and a row's output does not depend on its batch."""
    import onnx  # after ptbundle.builder (MindSpore first): see builder/onnx_export.py
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ptbundle.builder.graphs.quantize import blockwise_weights

    rng = np.random.RandomState(0)
    k, n = 100, 48  # K not a whole number of blocks: zero-padded
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.1
    w[3, 5] = 30.0  # an outlier: only column 5's first block is coarser
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("MatMul", ["y", "w2"], ["z"],
                                                                                     name="keep")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.eye(n, dtype=np.float32), "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "a.onnx"))
    assert blockwise_weights(tmp_path / "a.onnx", tmp_path / "b.onnx", bits=bits, block_size=32, exclude=("keep",)) == 1
    model = onnx.load(str(tmp_path / "b.onnx"))
    assert [nd.op_type for nd in model.graph.node] == ["MatMulNBits", "MatMul"]
    assert {t.name for t in model.graph.initializer} == {"mm.q%d" % bits, "mm.scales", "w2"}  # fp32 w gone
    packed = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "mm.q%d" % bits))
    scales = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "mm.scales")).reshape(n, -1)
    if bits == 4:  # two values a byte, the first in the low nibble
        packed = np.stack([packed & 15, packed >> 4], -1).reshape(n, scales.shape[1], -1)
    dequantized = ((packed.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]).reshape(n, -1)[:, :k].T
    assert np.abs(dequantized - w).max() <= 0.5 * scales.max() + 1e-6
    assert np.abs(dequantized[32:, 5] - w[32:, 5]).max() < 0.05 * 30.0 / (2 ** (bits - 1) - 1)  # other blocks fine

    session = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((6, k)).astype(np.float32)
    z = session.run(None, {"x": x})[0]
    expected = x @ dequantized
    assert np.abs(z - expected).max() <= 0.02 * np.abs(expected).max()  # activations int8 per block of 32
    alone = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    assert np.abs(alone - z).max() <= 1e-5 * np.abs(z).max()


def test_a_prompt_beyond_the_context_is_one_error_line_naming_both_numbers(bundles):
    code, err, _ = run("generate", bundles / "prefix", "x" * 240, "--max-new-tokens", 20)
    # 240 tokens + 20 > 256 - 5
    assert_one_error_line(code, err, "240", "20", "251")
    from ptbundle.runtime import Bundle
    from ptbundle.runtime.errors import InputError

    with pytest.raises(InputError):
        Bundle.load(bundles / "prefix").generate("x" * 240, max_new_tokens=20)


def test_generate_on_a_classifier_and_predict_on_a_generation_bundle_are_errors(tiny_bundle, bundles):
    from ptbundle.runtime import Bundle
    from ptbundle.runtime.errors import BundleError

    code, err, _ = run("generate", tiny_bundle, "hello")
    assert_one_error_line(code, err, "classifier")
    with pytest.raises(BundleError, match="generation bundle"):
        Bundle.load(bundles / "plain").predict(["hello"])
    with pytest.raises(BundleError, match="generation bundle"):
        Bundle.load(bundles / "plain").logits(["hello"])


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_a_missing_or_altered_prompt_cache_is_one_error_line(bundles, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(bundles / "prefix", copy)
    cache = copy / "prompt_cache.safetensors"
    if damage == "missing":
        cache.unlink()
    else:
        cache.write_bytes(cache.read_bytes() + b" ")
    code, err, _ = run("generate", copy, "hello", "--max-new-tokens", 2)
    assert_one_error_line(code, err, "prompt_cache.safetensors", "missing" if damage == "missing" else "sha256")


def test_info_shows_a_generation_bundle(bundles):
    code, err, out = run("info", bundles / "prefix")
    assert code == 0, err
    assert "generation bundle" in out and "5 positions" in out
    assert f"static KV cache of {CAPACITY} positions" in out


def test_a_failed_build_leaves_no_bundle(lm, tmp_path):
    from ptbundle.builder.errors import ExportError

    _, cfg, weights, _, cache = lm
    bad = {**cache, "key.0": cache["key.0"][:, :2]}  # layers differ in prompt length
    from ptbundle.builder.bundles.generation import write_generation_bundle

    with pytest.raises(ExportError, match="prompt length"):
        write_generation_bundle(tmp_path / "b", weights, cfg, lm[0] / "tokenizer.json", bad, name="x",
                                template=None, details={}, backbone=backbone_info(cfg))
    with pytest.raises(ExportError, match="MindIR capacity"):  # no room after the prompt cache
        write_generation_bundle(tmp_path / "b", weights, cfg, lm[0] / "tokenizer.json", cache, name="x",
                                template=None, details={}, backbone=backbone_info(cfg), mindir_capacity=P + 4)
    wrong = lambda ids, mask: llama_forward(weights, cfg, ids, mask) + 1.0  # noqa: E731
    with pytest.raises(ExportError, match="differ from the reference"):
        write_generation_bundle(tmp_path / "b", weights, cfg, lm[0] / "tokenizer.json", None, name="x",
                                template=None, details={}, backbone=backbone_info(cfg), reference=wrong)
    assert list(tmp_path.iterdir()) == []


# --- decoder.mindir: the same decoder for MindSpore, over a static KV cache ----------------------------------------

MINDIR_TOLERANCE = 1e-4  # max |logit difference|, logits of scale ~20: the bound decoder.onnx is held to above


@pytest.mark.parametrize("case", ["plain", "prefix"])
def test_the_bundle_has_a_hashed_mindir_graph_and_its_parity(bundles, case):
    from ptbundle.runtime.format import Manifest, sha256_file

    manifest = Manifest.read(bundles / case)
    assert manifest.files["decoder.mindir"] == sha256_file(bundles / case / "decoder.mindir")
    assert manifest.only.generation["mindir_capacity"] == CAPACITY
    assert 0 <= manifest.export["mindir"] <= MINDIR_TOLERANCE  # measured at export, prefill and decode


@pytest.mark.parametrize("case", ["plain", "prefix"])
def test_mindir_logits_equal_the_reference_and_onnx_in_prefill_and_decode(lm, bundles, case):
    from ptbundle.runtime import Bundle

    _, cfg, *_ = lm
    onnx = session_of(bundles / case)
    mindir = Bundle.load(bundles / case, backend="mindspore").generator.session
    ids, mask, expected = reference_batch(lm, case)  # right-padded rows of different lengths
    rows, last = np.arange(len(ids)), mask.sum(1) - 1
    logits, _ = mindir.prefill(ids, mask)
    assert np.abs(logits - expected[rows, last]).max() <= MINDIR_TOLERANCE
    assert np.abs(logits - onnx.prefill(ids, mask)[0]).max() <= MINDIR_TOLERANCE
    # the same calls to both: a prefill of 8 tokens, then one token at a time
    p = mindir.prompt_length
    ids = np.random.RandomState(5).randint(3, cfg.vocab_size, (2, 12)).astype(np.int64)
    a, onnx_cache = onnx.prefill(ids[:, :8], np.ones((2, 8)))
    b, mindir_cache = mindir.prefill(ids[:, :8], np.ones((2, 8)))
    for j in range(8, 12):
        assert np.abs(a - b).max() <= MINDIR_TOLERANCE
        step = (ids[:, j:j + 1], np.full((2, 1), p + j), np.ones((2, p + j + 1), np.int64))
        (a, onnx_cache), (b, mindir_cache) = onnx.run(*step, onnx_cache), mindir.run(*step, mindir_cache)
    assert np.abs(a - b).max() <= MINDIR_TOLERANCE


@pytest.mark.parametrize("case", ["plain", "prefix"])
def test_mindspore_greedy_generation_equals_onnxruntime_token_for_token(bundles, case):
    from ptbundle.runtime import Bundle

    onnx, mindir = Bundle.load(bundles / case), Bundle.load(bundles / case, backend="mindspore")
    # 1 to 57 tokens (one per byte): prefills padded to 8, 16, 32, 48 and, near the cache's end, 59 (not 64)
    prompts = ["a", "hello", "The film", "The film was", "über café ☕ and more", "x" * 40, "y" * 57]
    for prompt in prompts:
        steps = 2 if len(prompt) == 57 else 12
        expected = onnx.generate(prompt, max_new_tokens=steps)
        got = mindir.generate(prompt, max_new_tokens=steps)
        assert (got.token_ids, got.text, got.finish_reason) == (expected.token_ids, expected.text,
                                                                expected.finish_reason), prompt


def test_mindir_decode_steps_keep_one_shape(lm, bundles):
    """GraphCell prepares a graph per input shape: every decode step must bring the same ones."""
    from ptbundle.runtime import Bundle

    _, cfg, *_ = lm
    bundle = Bundle.load(bundles / "prefix", backend="mindspore")
    session = bundle.generator.session
    start = [c.asnumpy().copy() for c in session.start_caches(1)]
    for prompt in ("abc", "hello there", "hello again"):  # 3, 11 and 11 tokens
        assert len(bundle.generate(prompt, max_new_tokens=10).token_ids) == 10
    assert session.shapes == {(1, 8), (1, 16), (1, 1)}  # two prefill lengths, one decode shape for 27 steps
    cache_shapes = [(1, cfg.num_kv_heads, CAPACITY, cfg.head_dim)] * (2 * cfg.num_layers)
    _, cache = session.prefill(np.array([[5, 6, 7]]), np.ones((1, 3)))
    for position in range(P + 3, P + 8):
        assert [tuple(c.shape) for c in cache] == cache_shapes
        _, cache = session.run(np.array([[9]]), np.array([[position]]), np.ones((1, position + 1)), cache)
    # the graph returns new caches, never writing into those it is given: every prefill starts from the same ones
    for before, after in zip(start, session.start_caches(1)):
        assert np.array_equal(before, after.asnumpy())


def test_mindspore_on_a_bundle_without_decoder_mindir_is_one_error_line(bundles, tmp_path):
    from ptbundle.runtime import Bundle
    from ptbundle.runtime.errors import BundleError
    from ptbundle.runtime.format import Manifest

    old = tmp_path / "old"  # as bundles were before decoder.mindir
    shutil.copytree(bundles / "prefix", old)
    (old / "decoder.mindir").unlink()
    manifest = Manifest.read(old)
    task = manifest.only
    generation = {k: v for k, v in task.generation.items() if k != "mindir_capacity"}
    manifest.replace(files={k: v for k, v in manifest.files.items() if k != "decoder.mindir"}).replace_task(
        task.name, details={**task.details, "generation": generation}).write(old)
    with pytest.raises(BundleError, match="no decoder.mindir") as error:
        Bundle.load(old, backend="mindspore")
    assert "\n" not in str(error.value) and "onnxruntime" in str(error.value)
    assert Bundle.load(old).generate("hello", max_new_tokens=2).token_ids  # onnxruntime still runs it
    code, err, _ = run("generate", old, "hello", "--backend", "mindspore")
    assert_one_error_line(code, err, "no decoder.mindir")
    with pytest.raises(BundleError, match="no int8 decoder graph"):
        Bundle.load(bundles / "plain", backend="mindspore", int8=True)


def test_a_prompt_beyond_the_static_cache_is_refused_before_any_work(bundles):
    from ptbundle.runtime import Bundle
    from ptbundle.runtime.errors import InputError

    bundle = Bundle.load(bundles / "prefix", backend="mindspore")
    # 50 tokens + 10 = 60 > 64 - 5 = 59: beyond the static cache, well inside the model's 251
    with pytest.raises(InputError, match="static KV cache") as error:
        bundle.generate("x" * 50, max_new_tokens=10)
    for number in ("50", "10", "60", "59", "64"):
        assert number in str(error.value)
    assert bundle.generator.session.shapes == set()  # the graph was not called
    assert len(Bundle.load(bundles / "prefix").generate("x" * 50, max_new_tokens=10).token_ids) == 10
    code, err, _ = run("generate", bundles / "prefix", "x" * 50, "--max-new-tokens", 10, "--backend", "mindspore")
    assert_one_error_line(code, err, "static KV cache", "60", "59")


def test_pt_run_generate_with_the_mindspore_backend_prints_the_same_text(bundles):
    from ptbundle.runtime import Bundle

    expected = Bundle.load(bundles / "chat").generate("hello", max_new_tokens=8).text
    code, err, out = run("generate", bundles / "chat", "hello", "--max-new-tokens", 8, "--backend", "mindspore")
    assert code == 0, err
    assert out == expected + "\n"


def test_a_bad_mindir_capacity_in_the_manifest_names_the_field(bundles):
    from ptbundle.runtime.errors import BundleError
    from ptbundle.runtime.format import Manifest

    raw = json.loads((bundles / "prefix" / "manifest.json").read_text())
    for bad in (1000, P, "64"):  # beyond the model's 256 positions; no room after the prompt; not an integer
        raw["tasks"][0]["details"]["generation"]["mindir_capacity"] = bad
        with pytest.raises(BundleError, match="details.generation.mindir_capacity"):
            Manifest.from_json(raw)


def test_a_precision_generation_bundles_lack_is_one_line_naming_it(bundles):
    """bf16 is the openvino backend's, for classifier graphs: a generation bundle asked for it says so."""
    from ptbundle.runtime import Bundle
    from ptbundle.runtime.errors import BundleError

    with pytest.raises(BundleError, match="no backend runs bf16 decoder graphs"):
        Bundle.load(bundles / "plain", precision="bf16")
    code, err, _ = run("generate", bundles / "plain", "hello", "--max-new-tokens", 2, "--backend", "openvino")
    assert_one_error_line(code, err, "backend 'openvino' has no fp32 decoder graph (use backend='onnxruntime')")
