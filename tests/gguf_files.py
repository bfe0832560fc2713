"""Tiny GGUF files written in the real format with gguf.GGUFWriter, from a checkpoint directory written by
tests/checkpoints.py, as llama.cpp's convert_hf_to_gguf.py writes a Llama: Q and K rows permuted for its rotary
layout (`llama_cpp_permute`, LlamaModel.permute), norms in F32, the tokenizer as tokenizer.ggml.* metadata."""

from __future__ import annotations

import json

import gguf
import numpy as np
from safetensors.numpy import load_file

from ptbundle.builder.backbones import gguf as G

Q = gguf.GGMLQuantizationType
LAYER = {v: k for k, v in G.LAYER_TENSORS.items()}
GLOBAL = {v: k for k, v in G.GLOBAL_TENSORS.items()}


def llama_cpp_permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute: q with (heads, heads), k with (heads, kv heads)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in GLOBAL:
        return GLOBAL[hf]
    i, rest = hf[len("model.layers."):].split(".", 1)
    return f"blk.{i}.{LAYER[rest]}"


def gguf_tensors(cfg, weights):
    """GGUF name -> float32 array as convert_hf_to_gguf writes it (Q/K permuted), numpy order [out, in]."""
    out = {}
    for hf, w in weights.items():
        if hf.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg["num_attention_heads"], cfg["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        out[gguf_name(hf)] = w
    return out


def write_gguf(path, ckpt, qtype=Q.F32, arch="llama", drop=(), tokenizer_model="gpt2", raw=None, pre="smollm"):
    """A GGUF of the checkpoint directory `ckpt`; `drop`: metadata keys or tensor names to leave out; `raw`:
    {tensor name: (bytes array, type)} written as given."""
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(path), arch)
    a = arch + "."
    kv = {
        a + "block_count": lambda: w.add_block_count(cfg["num_hidden_layers"]),
        a + "context_length": lambda: w.add_context_length(cfg["max_position_embeddings"]),
        a + "embedding_length": lambda: w.add_embedding_length(cfg["hidden_size"]),
        a + "feed_forward_length": lambda: w.add_feed_forward_length(cfg["intermediate_size"]),
        a + "attention.head_count": lambda: w.add_head_count(cfg["num_attention_heads"]),
        a + "attention.head_count_kv": lambda: w.add_head_count_kv(cfg["num_key_value_heads"]),
        a + "rope.freq_base": lambda: w.add_rope_freq_base(cfg["rope_theta"]),
        a + "attention.layer_norm_rms_epsilon": lambda: w.add_layer_norm_rms_eps(cfg["rms_norm_eps"]),
        a + "rope.dimension_count": lambda: w.add_rope_dimension_count(cfg["head_dim"]),
        a + "vocab_size": lambda: w.add_vocab_size(cfg["vocab_size"]),
    }
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    kv.update({
        "tokenizer.ggml.model": lambda: w.add_tokenizer_model(tokenizer_model),
        "tokenizer.ggml.pre": lambda: w.add_tokenizer_pre(pre),
        "tokenizer.ggml.tokens": lambda: w.add_token_list(tokens),
        "tokenizer.ggml.token_type": lambda: w.add_token_types([3 if t in specials else 1 for t in tokens]),
        "tokenizer.ggml.merges": lambda: w.add_token_merges(merges),
        "tokenizer.ggml.bos_token_id": lambda: w.add_bos_token_id(cfg["bos_token_id"]),
        "tokenizer.ggml.eos_token_id": lambda: w.add_eos_token_id(cfg["eos_token_id"]),
        "tokenizer.ggml.padding_token_id": lambda: w.add_pad_token_id(cfg["pad_token_id"]),
        "tokenizer.ggml.add_bos_token": lambda: w.add_add_bos_token(False),
        "tokenizer.chat_template": lambda: w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}"
                                                               "<|im_end|>{% endfor %}"),
    })
    w.add_name("tiny-llama")
    for key, add in kv.items():
        if key not in drop:
            add()
    for name, t in gguf_tensors(cfg, load_file(str(ckpt / "model.safetensors"))).items():
        if name in drop:
            continue
        if raw and name in raw:
            data, kind = raw[name]
            w.add_tensor(name, data, raw_dtype=kind)
        elif t.ndim == 2 and qtype not in (Q.F32, Q.F16):
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        elif t.ndim == 2 and qtype == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
