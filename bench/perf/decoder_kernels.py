"""Which onnxruntime kernels run a Llama decoder (builder/decoder_onnx.py) fastest on this CPU.

    .venv/bin/python bench/perf/decoder_kernels.py [--repeats 10] [--smoke]

Random weights of SmolLM2-135M-Instruct's shape (30 layers, hidden 576, 9
heads over 3 key/value heads, head_dim 64, MLP 1536, vocab 49152, tied),
one graph per candidate `Kernels` (RMSNorm x rotary x attention), each
opened as the runtime opens it (runtime.onnx_backend.session_options) and run
on two shapes:

    prefill   1 x 64 new tokens, empty cache
    decode    1 new token after a 100-token cache

Milliseconds per call (median, min and max over --repeats calls, after one
warm-up; the candidates' calls interleaved round by round, all sessions
open at once, about 0.6 GB each).  The "gqa" candidate (com.microsoft.GroupQueryAttention) does not
take the graph's general mask (batch_size must be 1 for a prefill after a
cache), so it is measured for what it would buy, not offered.
Writes <results>/decoder_kernels.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

import mindspore  # noqa: E402,F401  before onnx (builder.onnx_export explains)
import onnxruntime as ort  # noqa: E402

DecoderConfig, Kernels = common.product("DecoderConfig"), common.product("Kernels")
decoder_graph, session_options = common.product("decoder_graph"), common.product("session_options")

SMOLLM2 = DecoderConfig(model_type="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                        num_kv_heads=3, head_dim=64, intermediate_size=1536, max_positions=8192, rms_norm_eps=1e-5,
                        rope_theta=100000.0, tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2)
CANDIDATES = [  # the first is the baseline: plain ops everywhere; then one change at a time; then combinations
    Kernels("ops", "ops", "matmul"),
    Kernels("simplified", "ops", "matmul"),
    Kernels("rms23", "ops", "matmul"),
    Kernels("ops", "rope23", "matmul"),
    Kernels("ops", "contrib", "matmul"),
    Kernels("ops", "ops", "attn23"),
    Kernels("ops", "ops", "gqa"),
    Kernels("simplified", "contrib", "matmul"),
    Kernels("rms23", "rope23", "attn23"),
]


def random_weights(cfg: DecoderConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    normal = lambda *shape: (rng.standard_normal(shape, np.float32) * 0.02)  # noqa: E731
    w = {"embed_tokens.weight": normal(cfg.vocab_size, h), "norm.weight": np.ones(h, np.float32)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        w.update({p + "input_layernorm.weight": np.ones(h, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(h, np.float32),
                  p + "self_attn.q_proj.weight": normal(cfg.num_heads * d, h),
                  p + "self_attn.k_proj.weight": normal(cfg.kv_width, h),
                  p + "self_attn.v_proj.weight": normal(cfg.kv_width, h),
                  p + "self_attn.o_proj.weight": normal(h, cfg.num_heads * d),
                  p + "mlp.gate_proj.weight": normal(f, h), p + "mlp.up_proj.weight": normal(f, h),
                  p + "mlp.down_proj.weight": normal(h, f)})
    return w


def feed(cfg: DecoderConfig, past: int, new: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {"input_ids": rng.integers(3, cfg.vocab_size, (1, new)).astype(np.int64),
           "position_ids": (past + np.arange(new, dtype=np.int64))[None],
           "attention_mask": np.ones((1, past + new), np.int64)}
    for i in range(cfg.num_layers):
        for name in (f"past_key.{i}", f"past_value.{i}"):
            out[name] = rng.standard_normal((1, cfg.num_kv_heads, past, cfg.head_dim), np.float32)
    return out


@click.command()
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(1))
@click.option("--smoke", is_flag=True, help="2 layers and one repeat: checks the script runs.")
@click.option("--results", type=click.Path(file_okay=False), default=str(common.RESULTS), show_default="bench/results")
def main(repeats, smoke, results):
    cfg = SMOLLM2 if not smoke else DecoderConfig(**{**SMOLLM2.__dict__, "num_layers": 2})
    repeats = 1 if smoke else repeats
    weights = random_weights(cfg)
    shapes = {"prefill 1x64": feed(cfg, 0, 64), "decode 1 after 100": feed(cfg, 100, 1)}
    # All sessions open at once and the calls interleaved, round by round: on a machine shared with other
    # work, a burst of load then slows every candidate alike instead of whichever ran during it.
    sessions = []
    for kernels in CANDIDATES:
        model = decoder_graph(weights, cfg, kernels).SerializeToString()
        sessions.append(ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"]))
        del model
    times = [{name: [] for name in shapes} for _ in CANDIDATES]
    for session in sessions:
        for inputs in shapes.values():
            session.run(None, inputs)  # warm-up: first-call allocations
    for _ in range(repeats):
        for session, row in zip(sessions, times):
            for name, inputs in shapes.items():
                start = time.perf_counter()
                session.run(None, inputs)
                row[name].append((time.perf_counter() - start) * 1000)
    rows = []
    print(f"{'norm':<11} {'rotary':<8} {'attention':<9} " + " ".join(f"{s + ' ms, median (min-max)':>32}" for s in shapes))
    for kernels, row in zip(CANDIDATES, times):
        figures = {name: common.spread(values, 2) for name, values in row.items()}
        rows.append({"kernels": kernels.__dict__, **figures})
        print(f"{kernels.norm:<11} {kernels.rotary:<8} {kernels.attention:<9} "
              + " ".join(f"{f['median']:>19.2f} ({f['min']:.2f}-{f['max']:.2f})" for f in figures.values()))
    common.write_results(results, "decoder_kernels", {
        "model": "SmolLM2-135M shape, random weights" if not smoke else "smoke: 2 layers", "repeats": repeats,
        "onnxruntime": ort.__version__, "machine": common.machine_info(),
        "unit": "ms per call", "rows": rows})


if __name__ == "__main__":
    main()
