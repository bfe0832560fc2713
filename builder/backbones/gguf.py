"""A GGUF file (llama.cpp's format) as a backbone directory in the Hugging Face layout, cached.

`hf_directory("SmolLM2-135M-Instruct.Q4_1.gguf")` returns a directory with
config.json (transformers' LlamaConfig keys), model.safetensors (float32,
transformers' LlamaForCausalLM tensor names), tokenizer.json (the `tokenizers`
library's format) and tokenizer_config.json (chat template and special token
strings, for the record), so everything downstream reads one layout.

The directory is <cache root>/<sha256 of the file, 16 hex digits>, written
into a temporary directory beside it and renamed into place, so a killed run
leaves no half cache; a second call only hashes the file and returns it.
The cache root is `cache_root`, else $PTBUNDLE_CACHE/gguf, else
~/.cache/ptbundle/gguf.

What the conversion undoes, as transformers' own GGUF loader does
(transformers 5.23: modeling_gguf_pytorch_utils.LlamaTensorProcessor and
integrations/gguf/gguf_tokenizer_mapping.py, read from their source):
- tensors are dequantized with `gguf.quants.dequantize`; GGUF lists shapes in
  ggml's order (fastest dimension first), the arrays come out in numpy's
  order, [out_features, in_features], which is the Hugging Face orientation;
- llama.cpp's converter permutes the rows of attn_q / attn_k so that each
  head's rotary pairs are interleaved; `_unpermute` puts them back
  (per head, rows [dim, 2] -> [2, dim]; attn_k with the kv head count);
- the tokenizer is rebuilt from tokenizer.ggml.* metadata: byte-level BPE
  (vocabulary, merges), the pre-tokenizer transformers picks for
  tokenizer.ggml.pre, control tokens (token_type 3) as special added tokens,
  user-defined ones (4) as plain added tokens.

Every problem (not a GGUF file, truncated, another architecture, a tensor
type we do not accept, missing metadata or tensor) is a one-line
BackboneError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ..errors import BackboneError

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
FORMAT = 1  # of the cache directory; part of source.json, a different value is rebuilt

# Tensor types we dequantize: floats, llama.cpp's legacy block quants and the k-quants (all exact in
# gguf.quants).  Not the IQ*/TQ* types (lookup-grid codebooks, slow in numpy) nor integer tensors.
ACCEPTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                  "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")

# GGUF tensor name -> transformers LlamaForCausalLM name; {i} is the layer.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# tokenizer.ggml.pre -> the split regex transformers puts before ByteLevel(use_regex=False)
# (integrations/gguf/gguf_tokenizer_mapping.py, GGUF_PRE_TOKENIZER_SPLITS).  Any other value, "smollm"
# and "gpt2" included, gets GPT2Tokenizer's plain ByteLevel(add_prefix_space=False) pre-tokenizer.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def default_cache_root() -> Path:
    env = os.environ.get("PTBUNDLE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "ptbundle") / "gguf"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hf_directory(gguf_path, cache_root=None) -> Path:
    """The Hugging Face layout directory of a Llama GGUF file, converted once and cached by the file's sha256."""
    path = Path(gguf_path)
    if not path.is_file():
        raise BackboneError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BackboneError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    digest = sha256_of(path)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / digest[:16]
    if _complete(target, digest):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=root))
    try:
        write_hf_directory(path, tmp)
        (tmp / "source.json").write_text(json.dumps(
            {"format": FORMAT, "gguf": path.name, "sha256": digest}, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if target.exists():  # a stale or incomplete directory (or another process finished first)
            if _complete(target, digest):
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _complete(directory: Path, digest: str) -> bool:
    try:
        source = json.loads((directory / "source.json").read_text())
    except (OSError, ValueError):
        return False
    return source.get("sha256") == digest and source.get("format") == FORMAT and \
        all((directory / f).is_file() for f in FILES)


def write_hf_directory(gguf_path, out_dir) -> None:
    """Convert (no cache): write config.json, model.safetensors, tokenizer.json, tokenizer_config.json into out_dir."""
    path, out = Path(gguf_path), Path(out_dir)
    reader = _open(path)
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture", str)
    if arch != "llama":
        raise BackboneError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, tensors, path)
    tokenizer, tokenizer_config = _tokenizer(meta, path)
    if tokenizer.get_vocab_size(with_added_tokens=True) > config["vocab_size"]:
        raise BackboneError(f"{path}: the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, "
                            f"more than the model's vocab_size {config['vocab_size']}")
    weights = _weights(tensors, config, path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


# --- reading ----------------------------------------------------------------------------------------------------

def _open(path: Path):
    try:  # the optional extra ptbundle[gguf]: imported only when a .gguf is read
        import gguf
    except ImportError as e:
        raise BackboneError(f"{path}: reading GGUF files needs the package gguf (pip install 'ptbundle[gguf]')") from e
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors on bad bytes
        reason = " ".join(str(e).split()) or type(e).__name__
        if "GGMLQuantizationType" in reason:
            raise BackboneError(f"{path}: a tensor has a type code the gguf package does not know ({reason})") from None
        raise BackboneError(f"{path}: not a readable GGUF file, truncated or corrupt ({reason})") from None


class _Metadata:
    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def __contains__(self, key):
        return key in self.fields

    def get(self, key, kind, default=...):
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise BackboneError(f"{self.path}: missing metadata {key!r}")
            return default
        try:
            value = field.contents()
        except Exception:
            raise BackboneError(f"{self.path}: metadata {key!r} cannot be read") from None
        if kind is list:
            if not isinstance(value, list):
                raise BackboneError(f"{self.path}: metadata {key!r} is not an array")
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            # stored as float32: 1e-05 reads back as 9.999999747378752e-06; keep the shortest decimal
            return float(str(np.float32(value)))
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise BackboneError(f"{self.path}: metadata {key!r} is {value!r}, not {kind.__name__}")
        return value


def _config(meta: _Metadata, tensors: dict, path: Path) -> dict:
    a = "llama."
    scaling = meta.get(f"{a}rope.scaling.type", str, "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise BackboneError(f"{path}: rope scaling {scaling if scaling != 'none' else 'rope_freqs'!r} is not supported "
                            "(plain rotary only)")
    hidden = meta.get(f"{a}embedding_length", int)
    heads = meta.get(f"{a}attention.head_count", int)
    kv_heads = meta.get(f"{a}attention.head_count_kv", int, heads)
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise BackboneError(f"{path}: attention.head_count {heads} is not a multiple of head_count_kv {kv_heads}")
    head_dim = meta.get(f"{a}rope.dimension_count", int, None) or meta.get(f"{a}attention.key_length", int, None) \
        or hidden // heads
    tokens = meta.get("tokenizer.ggml.tokens", list, None)
    vocab = meta.get(f"{a}vocab_size", int, None)
    if vocab is None:
        if "token_embd.weight" not in tensors:
            raise BackboneError(f"{path}: missing tensor 'token_embd.weight'")
        vocab = int(tensors["token_embd.weight"].shape[-1])  # ggml order: [hidden, vocab]
    special = {}
    for role, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}", int, None)
        if value is not None and not 0 <= value < (len(tokens) if tokens else vocab):
            raise BackboneError(f"{path}: metadata 'tokenizer.ggml.{key}' {value} is outside the vocabulary")
        special[role] = value
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta.get(f"{a}feed_forward_length", int),
        "num_hidden_layers": meta.get(f"{a}block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": meta.get(f"{a}context_length", int),
        "rms_norm_eps": meta.get(f"{a}attention.layer_norm_rms_epsilon", float),
        "rope_theta": meta.get(f"{a}rope.freq_base", float, 10000.0),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
        **special,
        "torch_dtype": "float32",
        "_name_or_path": meta.get("general.name", str, path.stem),
    }


def _expected_shapes(config: dict) -> dict:
    """transformers name -> numpy shape ([out, in] for projections)."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    per_layer = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (f, h),
                 "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def _hf_name(gguf_name: str):
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{LAYER_TENSORS[parts[2]]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of attn_q (n_head = heads) / attn_k (n_head = kv heads);
    transformers' LlamaTensorProcessor._reverse_permute_weights."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _weights(tensors: dict, config: dict, path: Path) -> dict:
    from gguf import quants  # the optional extra ptbundle[gguf] (_open has checked it is there)

    expected = _expected_shapes(config)
    by_hf = {}
    for name, t in tensors.items():
        hf = _hf_name(name)
        if hf is None or hf not in expected:
            raise BackboneError(f"{path}: unexpected tensor {name!r} for a {config['num_hidden_layers']}-layer llama")
        by_hf[hf] = t
    missing = [n for n in expected if n not in by_hf]
    if missing:
        gguf_names = {v: k for k, v in GLOBAL_TENSORS.items()}
        first = missing[0]
        if first.startswith("model.layers."):
            i, rest = first[len("model.layers."):].split(".", 1)
            first = f"blk.{i}." + {v: k for k, v in LAYER_TENSORS.items()}[rest]
        else:
            first = gguf_names[first]
        raise BackboneError(f"{path}: missing tensor {first!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = {}
    for hf, shape in expected.items():
        t = by_hf[hf]
        kind = t.tensor_type.name
        if kind not in ACCEPTED_TYPES:
            raise BackboneError(f"{path}: tensor {t.name!r} has type {kind}, which is not accepted "
                                f"(accepted: {', '.join(ACCEPTED_TYPES)})")
        ggml_shape = tuple(int(d) for d in t.shape)
        if ggml_shape[::-1] != shape:
            raise BackboneError(f"{path}: tensor {t.name!r} has shape {list(ggml_shape)} (ggml order), "
                                f"expected {list(shape[::-1])}")
        try:
            w = quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise BackboneError(f"{path}: tensor {t.name!r} of type {kind} cannot be dequantized "
                                f"({' '.join(str(e).split())})") from None
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        if hf.endswith("q_proj.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        if not np.isfinite(w).all():
            raise BackboneError(f"{path}: tensor {t.name!r} has non-finite values")
        out[hf] = np.ascontiguousarray(w)
    return out


# --- the tokenizer ----------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tokenizer(meta: _Metadata, path: Path):
    """(tokenizers.Tokenizer, tokenizer_config dict) from tokenizer.ggml.* metadata, as transformers builds it."""

    kind = meta.get("tokenizer.ggml.model", str)
    if kind != "gpt2":
        raise BackboneError(f"{path}: tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens = meta.get("tokenizer.ggml.tokens", list)
    types = meta.get("tokenizer.ggml.token_type", list, None) or []
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise BackboneError(f"{path}: metadata 'tokenizer.ggml.tokens' is empty or not strings")
    # GGUFWriter leaves out an empty merges array: that is fine for a vocabulary of single bytes (and added
    # tokens), not otherwise (transformers would guess merges from scores; we do not guess).
    plain = [t for t, k in zip(tokens, types or [1] * len(tokens)) if k not in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    merges = meta.get("tokenizer.ggml.merges", list, None if all(len(t) == 1 for t in plain) else ...) or []
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):  # a token outside the byte alphabet is respelled, as transformers does
        vocab[token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))] = index
    pairs = []
    for merge in merges:
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise BackboneError(f"{path}: metadata 'tokenizer.ggml.merges' has {merge!r}, not two tokens")
        pairs.append(pair)
    try:
        tok = Tokenizer(models.BPE(vocab, pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False))
    except Exception as e:
        raise BackboneError(f"{path}: the tokenizer metadata do not make a BPE tokenizer ({' '.join(str(e).split())})") \
            from None
    pre = meta.get("tokenizer.ggml.pre", str, None)
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()

    def token_of(key):
        index = meta.get(f"tokenizer.ggml.{key}", int, None)
        return None if index is None or not 0 <= index < len(tokens) else tokens[index]

    special = {role: token_of(key) for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                      ("unk_token", "unknown_token_id"),
                                                      ("pad_token", "padding_token_id"))}
    control = [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL and set(t) <= alphabet]
    control += [t for t in special.values() if t is not None and t in vocab and t not in control]
    if control:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    add_bos = meta.get("tokenizer.ggml.add_bos_token", bool, False)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", bool, False)
    if (add_bos and special["bos_token"] is None) or (add_eos and special["eos_token"] is None):
        raise BackboneError(f"{path}: the metadata ask to add a bos/eos token but give no token id for it")
    if add_bos or add_eos:
        bos = [(special["bos_token"], vocab[special["bos_token"]])] if add_bos else []
        eos = [(special["eos_token"], vocab[special["eos_token"]])] if add_eos else []
        a = " ".join([t for t, _ in bos] + ["$A:0"] + [t for t, _ in eos])
        b = " ".join([t for t, _ in bos] + ["$A:0"] + [t for t, _ in eos] + [t + ":1" for t, _ in bos] + ["$B:1"]
                     + [t + ":1" for t, _ in eos])
        tok.post_processor = processors.TemplateProcessing(single=a, pair=b, special_tokens=list(dict(bos + eos).items()))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "tokenizer_ggml_pre": pre,
        "chat_template": meta.get("tokenizer.chat_template", str, None),
    }
    return tok, config
