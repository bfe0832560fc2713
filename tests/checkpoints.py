"""Tiny random checkpoints in the real Hugging Face layout, for tests.

`write_checkpoint(dir, "bert")` writes config.json, model.safetensors (tensor
names as transformers saves them, with the "bert."/"roberta." prefix) and a
real `tokenizers` tokenizer.json.  Everything is drawn from a seeded
RandomState, so the same call writes the same bytes on every machine; the
reference logits in fixtures/ were computed from exactly these weights by
fixtures/make_reference.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

WORDS = (
    "the a an and but or not no very really quite so too movie film story plot acting actor "
    "cast scene script director good great fine wonderful brilliant funny moving bad awful "
    "terrible boring dull weak long short slow is was it this that of to in with for on "
    "love hate like best worst ever never one two , . ! ? ' s"
).split()

HIDDEN, LAYERS, HEADS, INTERMEDIATE, MAX_POSITIONS = 32, 2, 4, 64, 128
# Room for the default --max-length 128 plus a prompt; drawn from a second
# generator so the other weights (and the tests' learnability) stay as they were.
EXTRA_POSITIONS = 32

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"  # reference outputs computed once with PyTorch + transformers + PEFT
ROOT = TESTS.parent


def bert_tokenizer() -> Tokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return tok


def roberta_tokenizer() -> Tokenizer:
    """Byte-level BPE with the byte alphabet and no merges: tiny but real."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.decoder = decoders.ByteLevel()
    return tok


def config(model_type: str, vocab_size: int) -> dict:
    roberta = model_type == "roberta"
    return {
        "architectures": ["RobertaModel" if roberta else "BertModel"],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "hidden_act": "gelu",
        "max_position_embeddings": MAX_POSITIONS + EXTRA_POSITIONS + (2 if roberta else 0),
        "type_vocab_size": 1 if roberta else 2,
        "layer_norm_eps": 1e-12 if not roberta else 1e-5,
        "pad_token_id": 1 if roberta else 0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
    }


def random_weights(cfg: dict, seed: int) -> dict:
    rng = np.random.RandomState(seed)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]

    def normal(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def norm():  # LayerNorm weights near 1, so the random net stays well scaled
        return 1.0 + normal(h) * 0.5, normal(h) * 0.5

    p = cfg["model_type"] + "."
    w = {
        p + "embeddings.word_embeddings.weight": normal(cfg["vocab_size"], h),
        p + "embeddings.position_embeddings.weight": np.concatenate([
            normal(cfg["max_position_embeddings"] - EXTRA_POSITIONS, h),
            (np.random.RandomState(seed + 1).standard_normal((EXTRA_POSITIONS, h)) * 0.2).astype(np.float32)]),
        p + "embeddings.token_type_embeddings.weight": normal(cfg["type_vocab_size"], h),
    }
    w[p + "embeddings.LayerNorm.weight"], w[p + "embeddings.LayerNorm.bias"] = norm()
    for n in range(cfg["num_hidden_layers"]):
        l = f"{p}encoder.layer.{n}."
        for proj in ("query", "key", "value"):
            w[l + f"attention.self.{proj}.weight"] = normal(h, h)
            w[l + f"attention.self.{proj}.bias"] = normal(h)
        w[l + "attention.output.dense.weight"] = normal(h, h)
        w[l + "attention.output.dense.bias"] = normal(h)
        w[l + "attention.output.LayerNorm.weight"], w[l + "attention.output.LayerNorm.bias"] = norm()
        w[l + "intermediate.dense.weight"] = normal(i, h)
        w[l + "intermediate.dense.bias"] = normal(i)
        w[l + "output.dense.weight"] = normal(h, i)
        w[l + "output.dense.bias"] = normal(h)
        w[l + "output.LayerNorm.weight"], w[l + "output.LayerNorm.bias"] = norm()
    if cfg["model_type"] == "bert":
        w[p + "pooler.dense.weight"] = normal(h, h)
        w[p + "pooler.dense.bias"] = normal(h)
    return w


def write_checkpoint(directory, model_type: str = "bert", seed: int = 0) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = bert_tokenizer() if model_type == "bert" else roberta_tokenizer()
    cfg = config(model_type, tok.get_vocab_size())
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(random_weights(cfg, seed), str(directory / "model.safetensors"))
    tok.save(str(directory / "tokenizer.json"))
    return directory


def random_head(hidden: int, num_virtual_tokens: int, num_labels: int, seed: int) -> dict:
    """A prompt and head to compare implementations with (not trained, just fixed)."""
    rng = np.random.RandomState(seed)
    return {
        "prompt_embeddings": (rng.standard_normal((num_virtual_tokens, hidden)) * 0.5).astype(np.float32),
        "pooler.weight": (rng.standard_normal((hidden, hidden)) * 0.1).astype(np.float32),
        "pooler.bias": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
        "classifier.weight": (rng.standard_normal((num_labels, hidden)) * 0.5).astype(np.float32),
        "classifier.bias": (rng.standard_normal(num_labels) * 0.1).astype(np.float32),
    }


SENTENCES = [
    "a great movie",
    "this film was terrible , boring and far too long !",
    "not bad",
    "the acting is wonderful but the plot is dull",
    "one of the best films ever",
]


def padded_inputs(tokenizer_path, model_type: str, texts, reset: bool = False) -> dict:
    """input_ids, attention_mask, token_type_ids (int32, right-padded to the longest) as transformers receives them,
    for the fixture scripts (fixtures/make_*reference.py).  `reset`: MiniLM's tokenizer.json pads to a fixed 128
    and truncates; drop that first."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    if reset:
        tok.no_padding()
        tok.no_truncation()
    pad_id, pad = (1, "<pad>") if model_type == "roberta" else (0, "[PAD]")
    assert tok.token_to_id(pad) == pad_id
    tok.enable_padding(pad_id=pad_id, pad_token=pad)
    enc = tok.encode_batch(texts)
    get = lambda f: np.array([getattr(e, f) for e in enc], dtype=np.int32)  # noqa: E731
    return {"input_ids": get("ids"), "attention_mask": get("attention_mask"), "token_type_ids": get("type_ids")}


# --- a tiny Llama (decoder) in the Hugging Face layout ---------------------------------------------------------
# Shaped like SmolLM2 (grouped-query attention, tied embeddings, byte-level BPE with its three special tokens
# first), only smaller; fixtures/make_llama_reference.py computed its reference logits with transformers.

LLAMA_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2


def llama_tokenizer() -> Tokenizer:
    """Byte-level BPE over the byte alphabet (no merges) after SmolLM2's three special tokens; adds nothing."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(list(LLAMA_SPECIALS) + alphabet)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token=None))
    tok.add_special_tokens(list(LLAMA_SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def llama_config(vocab_size: int, tie: bool = True) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 2,
        "head_dim": HIDDEN // HEADS,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32",
    }


def head_dim(cfg: dict) -> int:
    """head_dim from the config, else hidden_size // num_attention_heads (Qwen2's configs have no head_dim)."""
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def llama_weights(cfg: dict, seed: int) -> dict:
    rng = np.random.RandomState(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = head_dim(cfg)
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def normal(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(v, h, scale=1.0), "model.norm.weight": 1.0 + normal(h)}
    for n in range(cfg["num_hidden_layers"]):
        l = f"model.layers.{n}."
        w[l + "input_layernorm.weight"] = 1.0 + normal(h)
        w[l + "self_attn.q_proj.weight"] = normal(q, h)
        w[l + "self_attn.k_proj.weight"] = normal(kv, h)
        w[l + "self_attn.v_proj.weight"] = normal(kv, h)
        w[l + "self_attn.o_proj.weight"] = normal(h, q)
        w[l + "post_attention_layernorm.weight"] = 1.0 + normal(h)
        w[l + "mlp.gate_proj.weight"] = normal(f, h)
        w[l + "mlp.up_proj.weight"] = normal(f, h)
        w[l + "mlp.down_proj.weight"] = normal(h, f)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(v, h)
    return w


def write_decoder_checkpoint(directory, config_fn, weights_fn, seed: int = 0, tie: bool = True) -> Path:
    """config.json (config_fn(vocab_size, tie)), model.safetensors (weights_fn(cfg, seed)) and the byte-level
    tokenizer.json of llama_tokenizer(), for the decoder checkpoints below."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = llama_tokenizer()
    cfg = config_fn(tok.get_vocab_size(), tie)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(weights_fn(cfg, seed), str(directory / "model.safetensors"))
    tok.save(str(directory / "tokenizer.json"))
    return directory


def write_llama_checkpoint(directory, seed: int = 0, tie: bool = True) -> Path:
    """config.json, model.safetensors (transformers' LlamaForCausalLM names) and tokenizer.json of a tiny Llama."""
    return write_decoder_checkpoint(directory, llama_config, llama_weights, seed, tie)


# --- a tiny Qwen2 (Qwen2.5 family) in the Hugging Face layout --------------------------------------------------
# Llama plus biases on q_proj, k_proj and v_proj (none on o_proj or the MLP), and Qwen2.5's config conventions:
# no head_dim key (hidden_size // num_attention_heads), rope_theta 1e6, rms_norm_eps 1e-6, use_sliding_window
# false.  Same sizes and byte-level tokenizer as the Llama; fixtures/make_qwen2_reference.py computed its
# reference logits with transformers' Qwen2ForCausalLM.


def qwen2_config(vocab_size: int, tie: bool = True) -> dict:
    cfg = llama_config(vocab_size, tie)
    for key in ("head_dim", "attention_bias", "mlp_bias"):  # not Qwen2 config keys: its biases are fixed
        del cfg[key]
    cfg.update({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": cfg["max_position_embeddings"],  # present in Qwen2.5's configs, unused while off
        "max_window_layers": LAYERS,
        "attention_dropout": 0.0,
    })
    return cfg


def qwen2_weights(cfg: dict, seed: int) -> dict:
    """llama_weights(cfg, seed) (so every weight matrix equals the Llama checkpoint's of the same seed) plus
    NON-ZERO q/k/v biases, normal * 0.5 from RandomState(seed + 1), layer by layer in q, k, v order."""
    w = llama_weights(cfg, seed)
    rng = np.random.RandomState(seed + 1)
    d = head_dim(cfg)
    widths = {"q": cfg["num_attention_heads"] * d, "k": cfg["num_key_value_heads"] * d, "v": cfg["num_key_value_heads"] * d}
    for n in range(cfg["num_hidden_layers"]):
        for proj, width in widths.items():
            w[f"model.layers.{n}.self_attn.{proj}_proj.bias"] = (rng.standard_normal(width) * 0.5).astype(np.float32)
    return w


def write_qwen2_checkpoint(directory, seed: int = 0, tie: bool = True) -> Path:
    """config.json, model.safetensors (transformers' Qwen2ForCausalLM names) and tokenizer.json of a tiny Qwen2."""
    return write_decoder_checkpoint(directory, qwen2_config, qwen2_weights, seed, tie)
