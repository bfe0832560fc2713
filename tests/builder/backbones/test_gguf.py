"""builder.gguf: a GGUF file -> the Hugging Face layout, checked on tiny GGUFs written in the real format.

The GGUFs are written with gguf.GGUFWriter from the tiny Llama of checkpoints.write_llama_checkpoint, as
llama.cpp's convert_hf_to_gguf.py writes a Llama: Q and K rows permuted for its rotary layout
(`llama_cpp_permute`, LlamaModel.permute), norms in F32, the tokenizer as tokenizer.ggml.* metadata
(model "gpt2", tokens, token types with the specials as CONTROL, merges).  The real SmolLM2 file is
compared with transformers' own GGUF loading by bench/experiments/gguf_parity.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from checkpoints import LLAMA_SPECIALS, WORDS, write_llama_checkpoint

gguf = pytest.importorskip("gguf")
from ptbundle.builder.backbones import gguf as G  # noqa: E402
from ptbundle.builder.errors import BackboneError  # noqa: E402
from gguf_files import Q, gguf_name, gguf_tensors, llama_cpp_permute, write_gguf  # noqa: E402

SAMPLES = ["a great movie", "this film was terrible , boring and far too long !", "not bad ... 2024 naïve café 😀",
           "<|im_start|>user\nthe acting is wonderful<|im_end|>\n<|im_start|>assistant\n", "  two  spaces\tand\n\nlines",
           "<|endoftext|>the best<|im_end|>"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_llama_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_llama_untied(tmp_path_factory):
    return write_llama_checkpoint(tmp_path_factory.mktemp("tiny-llama-untied"), tie=False)


def convert(tmp_path, ckpt, **kw):
    return G.hf_directory(write_gguf(tmp_path / "model.gguf", ckpt, **kw), tmp_path / "cache")


def test_permutation_is_transformers_inverse():
    w = np.arange(8 * 2 * 3 * 5, dtype=np.float32).reshape(48, 5)
    for heads, kv in ((8, 8), (8, 2), (6, 3)):
        rows = (kv * 2 * 3) if kv != heads else heads * 2 * 3
        x = w[:rows]
        assert np.array_equal(G._unpermute(llama_cpp_permute(x, heads, kv), kv), x)
        assert not np.array_equal(llama_cpp_permute(x, heads, kv), x)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_untied"])
def test_f32_roundtrip_is_exact(tmp_path, fixture, request):
    ckpt = request.getfixturevalue(fixture)
    out = convert(tmp_path, ckpt)
    assert sorted(p.name for p in out.iterdir()) == sorted(G.FILES + ("source.json",))
    want, got = load_file(str(ckpt / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == np.float32 and np.array_equal(got[name], want[name]), name
    cfg, orig = json.loads((out / "config.json").read_text()), json.loads((ckpt / "config.json").read_text())
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act")
    assert {k: cfg[k] for k in keys} == {k: orig[k] for k in keys}
    from ptbundle.builder.backbones.architectures.llama import LLAMA
    from ptbundle.builder.backbones.configs import decoder_config

    assert decoder_config(LLAMA, cfg, out / "config.json") == decoder_config(LLAMA, orig, ckpt / "config.json")
    extra = json.loads((out / "tokenizer_config.json").read_text())
    assert (extra["bos_token"], extra["eos_token"], extra["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert extra["chat_template"].startswith("{% for m in messages %}")


def blockwise_bound(w, per_block):
    blocks = w.reshape(w.shape[0], -1, 32)
    return np.repeat(per_block(blocks), 32, axis=-1).reshape(w.shape)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.F16])
def test_quantized_within_quantization_error(tmp_path, tiny_llama, qtype):
    out = convert(tmp_path, tiny_llama, qtype=qtype)
    want, got = load_file(str(tiny_llama / "model.safetensors")), load_file(str(out / "model.safetensors"))
    cfg = json.loads((tiny_llama / "config.json").read_text())
    permuted = gguf_tensors(cfg, want)
    for name, w in want.items():
        if w.ndim == 1:
            assert np.array_equal(got[name], w), name
            continue
        # exactly what gguf's own quantize -> dequantize gives, un-permuted
        if qtype == Q.F16:
            exact = permuted[gguf_name(name)].astype(np.float16).astype(np.float32)
        else:
            exact = gguf.quants.dequantize(gguf.quants.quantize(permuted[gguf_name(name)], qtype), qtype)
        if "q_proj" in name:
            exact = G._unpermute(exact, cfg["num_attention_heads"])
        elif "k_proj" in name:
            exact = G._unpermute(exact, cfg["num_key_value_heads"])
        assert np.array_equal(got[name], exact), name
        # and within the format's error of the original: half a step, plus the fp16 rounding of the scales
        if qtype == Q.Q8_0:
            bound = blockwise_bound(w, lambda b: np.abs(b).max(-1, keepdims=True) * (0.5 / 127 + 2 ** -11))
        elif qtype == Q.Q4_1:
            bound = blockwise_bound(w, lambda b: (b.max(-1, keepdims=True) - b.min(-1, keepdims=True)) / 15 * 0.5
                                    * 1.01 + np.abs(b).max(-1, keepdims=True) * 2 ** -10)
        else:
            bound = np.abs(w) * 2 ** -11 + 1e-7
        assert (np.abs(got[name] - w) <= bound).all(), (name, float(np.abs(got[name] - w).max()))
        assert not np.array_equal(got[name], w), name  # it really was quantized


def bpe_checkpoint(directory):
    """The tiny Llama with a trained byte-level BPE (real merges) and an embedding row per token."""
    ckpt = write_llama_checkpoint(directory)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=list(LLAMA_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3, trainer)
    tok.save(str(ckpt / "tokenizer.json"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vocab_size"] = tok.get_vocab_size()
    (ckpt / "config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import save_file

    weights = load_file(str(ckpt / "model.safetensors"))
    e = weights["model.embed_tokens.weight"]
    extra = np.random.RandomState(5).standard_normal((cfg["vocab_size"] - e.shape[0], e.shape[1])).astype(np.float32)
    weights["model.embed_tokens.weight"] = np.concatenate([e, extra])
    save_file(weights, str(ckpt / "model.safetensors"))
    return ckpt, tok


@pytest.mark.parametrize("trained", [False, True])
def test_tokenizer_ids_equal_the_original(tmp_path, tiny_llama, trained):
    ckpt, original = bpe_checkpoint(tmp_path / "bpe") if trained else \
        (tiny_llama, Tokenizer.from_file(str(tiny_llama / "tokenizer.json")))
    if trained:  # without its merges it is no tokenizer
        path = write_gguf(tmp_path / "no-merges.gguf", ckpt, drop=("tokenizer.ggml.merges",))
        with pytest.raises(BackboneError, match="missing metadata 'tokenizer.ggml.merges'"):
            G.hf_directory(path, tmp_path / "cache")
        assert len(json.loads((ckpt / "tokenizer.json").read_text())["model"]["merges"]) > 30
    out = convert(tmp_path, ckpt)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert ours.get_vocab_size() == original.get_vocab_size()
    texts = SAMPLES + [" ".join(WORDS[i::7]) for i in range(7)]
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special).ids == original.encode(text, add_special_tokens=special).ids
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    ids = ours.encode("<|im_start|>user<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2  # the specials stay whole
    if trained:
        assert len(ours.encode(texts[-1]).ids) < len(texts[-1].encode())  # the merges are used


def test_cache_is_reused_and_atomic(tmp_path, tiny_llama, monkeypatch):
    path = write_gguf(tmp_path / "model.gguf", tiny_llama)
    cache = tmp_path / "cache"
    first = G.hf_directory(path, cache)
    assert first.parent == cache and first.name == G.sha256_of(path)[:16]
    stamp = {f.name: f.stat().st_mtime_ns for f in first.iterdir()}
    monkeypatch.setattr(G, "write_hf_directory", lambda *a: pytest.fail("the cache was not used"))
    assert G.hf_directory(path, cache) == first
    assert {f.name: f.stat().st_mtime_ns for f in first.iterdir()} == stamp
    monkeypatch.undo()
    # the default root: $PTBUNDLE_CACHE/gguf
    monkeypatch.setenv("PTBUNDLE_CACHE", str(tmp_path / "env"))
    assert G.hf_directory(path) == tmp_path / "env" / "gguf" / first.name
    # a run killed while writing leaves nothing behind, and a half directory is rebuilt
    other = tmp_path / "other"

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        G.hf_directory(path, other)
    assert list(other.iterdir()) == []
    monkeypatch.undo()
    (other / first.name).mkdir()
    (other / first.name / "config.json").write_text("{}")
    again = G.hf_directory(path, other)
    assert again == other / first.name and (again / "model.safetensors").is_file()
    assert sorted(p.name for p in other.iterdir()) == [first.name]


def iq4_nl_bytes(rows, cols):
    return np.zeros((rows, cols // 32 * 18), dtype=np.uint8)


BAD = {
    "not-gguf": (None, "not a GGUF file"),
    "truncated": (None, "truncated or corrupt"),
    "gemma": (dict(arch="gemma"), "architecture 'gemma' is not supported (only 'llama')"),
    "iq4": (dict(raw={"blk.0.attn_v.weight": (iq4_nl_bytes(16, 32), Q.IQ4_NL)}),
            "tensor 'blk.0.attn_v.weight' has type IQ4_NL, which is not accepted"),
    "no-tokens": (dict(drop=("tokenizer.ggml.tokens",)), "missing metadata 'tokenizer.ggml.tokens'"),
    "no-tokenizer-model": (dict(drop=("tokenizer.ggml.model",)), "missing metadata 'tokenizer.ggml.model'"),
    "sentencepiece": (dict(tokenizer_model="llama"),
                      "tokenizer model 'llama' is not supported (only 'gpt2' byte-level BPE)"),
    "no-tensor": (dict(drop=("blk.1.ffn_up.weight",)), "missing tensor 'blk.1.ffn_up.weight'"),
    "no-heads": (dict(drop=("llama.attention.head_count",)), "missing metadata 'llama.attention.head_count'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_backbone_error(tmp_path, tiny_llama, case):
    kw, message = BAD[case]
    path = tmp_path / "model.gguf"
    if case == "not-gguf":
        path.write_text("config = {}\n")
    elif case == "truncated":
        good = write_gguf(tmp_path / "good.gguf", tiny_llama).read_bytes()
        path.write_bytes(good[: len(good) // 2])
    else:
        write_gguf(path, tiny_llama, **kw)
    with pytest.raises(BackboneError) as e:
        G.hf_directory(path, tmp_path / "cache")
    text = str(e.value)
    assert message in text and text.startswith(str(path)) and "\n" not in text, text
    assert not (tmp_path / "cache").exists() or [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_missing_file(tmp_path):
    with pytest.raises(BackboneError, match="no such GGUF file"):
        G.hf_directory(tmp_path / "nothing.gguf", tmp_path / "cache")
