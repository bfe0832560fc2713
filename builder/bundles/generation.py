"""Write a generation bundle: a Llama-family decoder, its prompt cache and tokenizer, atomically.

The files and the graph's signature are runtime.format's (module docstring
there).  As builder.bundles.classifier.write_bundle does for classifiers, the bundle is
assembled in a hidden temporary directory beside its destination, every
written graph is run back (the ONNX ones with onnxruntime, decoder.mindir
with MindSpore) and compared with the reference the caller passes, and only
then is the directory renamed into place: a failure (or Ctrl-C) leaves no
partial bundle.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper
from safetensors.numpy import save_file

from ptbundle.runtime.format import (DECODER_GRAPHS, GENERATE, GENERATION_DETAIL, MINDIR_CAPACITY, PROMPT_CACHE,
                                     TOKENIZER, BackboneInfo, Manifest, Task, prompt_cache_names)
from ptbundle.runtime.generate import DecoderSession
from ptbundle.runtime.mindspore_generate import StaticDecoderSession

from ..backbones.configs import DecoderConfig
from .writer import write_atomically
from ..errors import ExportError
from ..graphs.mindir_decoder import export_decoder_mindir
from ..graphs.onnx_decoder import LM_HEAD_NODE, decoder_graph, llama_weights
from ..graphs.quantize import blockwise_weights
from ..graphs.targets import ragged_batches
from ..models.decoder import Decoder
from ..models.device import frozen

# Max |logit difference| of decoder.onnx from the reference, relative to the largest |logit| (at least 1):
# fp32 sums in another order over 30 layers drift by about 1e-6 of the logits' scale.
PARITY_TOLERANCE = 1e-4
PARITY_SHAPES = ((1, 9), (3, 12))  # (batch, seq) right-padded probes, each checked as prefill and as decode
# decoder.mindir's cache slots unless the caller says: a static cache costs its whole capacity in memory and in
# attention at every step, so not SmolLM2's 8,192 positions, but room for a long chat.
MINDIR_CAPACITY_DEFAULT = 2048


def write_generation_bundle(destination, weights: dict, cfg: DecoderConfig, tokenizer_path, prompt_cache: dict | None,
                            *, name: str, template: str | None, details: dict, backbone: BackboneInfo,
                            device: str = "CPU", quantize: bool = False, prompt_method: str = "none",
                            recipe: dict | None = None, metrics: dict | None = None,
                            reference: Callable | None = None, mindir_capacity: int | None = None) -> Manifest:
    """Write the bundle at `destination` (replacing any there) and return its manifest.

    `weights`: the decoder's arrays, transformers' names with or without "model." (decoder_onnx.llama_weights).
    `prompt_cache`: "key.{i}"/"value.{i}" -> float32 [kv_heads, P, head_dim], or None for no prompt.
    `reference(input_ids, attention_mask)`: int64 [batch, seq] each -> float logits [batch, seq, vocab] of the
    model with its prompt in front (the trained model, or transformers'); every written graph is checked
    against it, and the largest difference goes into the manifest's `export`.  Without it the fp32 graph
    is checked against itself only (prefill then decode against one pass).
    `mindir_capacity`: the cache slots of decoder.mindir (prompt cache, prompt and new tokens together;
    default min(max_positions, MINDIR_CAPACITY_DEFAULT)), recorded in the manifest.
    """
    destination = Path(destination)
    cache = prompt_cache_arrays(prompt_cache, cfg)
    p = next(iter(cache.values())).shape[1]
    capacity = static_capacity(mindir_capacity, cfg, p)
    task = Task(name=name, kind=GENERATE, labels=(), pair=False, max_length=cfg.max_positions - p, pooling="none",
                head="lm", prompt_method=prompt_method, num_virtual_tokens=p, template=template,
                recipe=dict(recipe or {}),
                details={**details, GENERATION_DETAIL: {
                    "eos_token_ids": list(cfg.eos_token_ids), "max_positions": cfg.max_positions,
                    "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                    "vocab_size": cfg.vocab_size, MINDIR_CAPACITY: capacity}},
                metrics=dict(metrics or {}))
    manifest = Manifest(tasks=(task,), pad_id=cfg.pad_token_id, backbone=backbone, device=device)

    def fill(tmp: Path) -> Manifest:
        fp32 = tmp / DECODER_GRAPHS["onnx"]
        model = decoder_graph(weights, cfg)
        # No onnx.checker: it does not know onnxruntime's kernels; the parity check below loads and runs it.
        onnx.save(model, str(fp32))
        del model
        export = {"onnx": check_graph(fp32, cfg, cache, reference)}
        if quantize:
            int8 = tmp / DECODER_GRAPHS["onnx-int8"]
            quantize_decoder(fp32, int8)
            # int8 is not held to the fp32 tolerance: its difference is recorded, and the test suite
            # checks greedy ids and logits stay close (tests/runtime/test_generate.py)
            export["onnx-int8"] = check_graph(int8, cfg, cache, reference, tolerance=None)
        export["mindir"] = write_mindir(tmp / DECODER_GRAPHS["mindir"], weights, cfg, capacity, cache, reference,
                                        device)
        save_file(cache, str(tmp / PROMPT_CACHE))
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        return manifest.replace(export=export)

    return write_atomically(destination, fill)


def prompt_cache_arrays(prompt_cache: dict | None, cfg: DecoderConfig) -> dict:
    """Every layer's "key.{i}" and "value.{i}", float32 [kv_heads, P, head_dim] (P = 0 without a prompt)."""
    empty = np.zeros((cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    out, lengths = {}, set()
    for i in range(cfg.num_layers):
        for name in prompt_cache_names(i):
            value = empty if not prompt_cache else prompt_cache.get(name)
            if value is None:
                raise ExportError(f"prompt cache: no {name!r} (it needs key.i and value.i for each of the"
                                  f" {cfg.num_layers} layers)")
            value = np.ascontiguousarray(np.asarray(value, np.float32))
            if value.ndim != 3 or value.shape[0] != cfg.num_kv_heads or value.shape[2] != cfg.head_dim:
                raise ExportError(f"prompt cache: {name!r} has shape {list(value.shape)}, not [kv_heads"
                                  f" {cfg.num_kv_heads}, P, head_dim {cfg.head_dim}]")
            out[name] = value
            lengths.add(value.shape[1])
    if len(lengths) != 1:
        raise ExportError(f"prompt cache: layers differ in prompt length ({sorted(lengths)})")
    if lengths.pop() >= cfg.max_positions:
        raise ExportError(f"prompt cache: the prompt fills the model's {cfg.max_positions} positions")
    return out


def static_capacity(capacity: int | None, cfg: DecoderConfig, p: int) -> int:
    """decoder.mindir's cache slots: at most the model's positions, and room after the prompt cache for the
    parity probes (a prefill of the longest and one decode step)."""
    if capacity is None:
        capacity = min(cfg.max_positions, MINDIR_CAPACITY_DEFAULT)
    fewest = p + max(seq for _, seq in PARITY_SHAPES) + 1
    if not fewest <= capacity <= cfg.max_positions:
        raise ExportError(f"MindIR capacity (--mindir-capacity) {capacity}: it must be from {fewest} (the prompt"
                          f" cache's {p} positions and room for the parity probes) to the model's"
                          f" {cfg.max_positions} positions")
    return capacity


def write_mindir(path: Path, weights: dict, cfg: DecoderConfig, capacity: int, cache: dict,
                 reference: Callable | None, device: str) -> float:
    """decoder.mindir from the MindSpore Decoder that training uses, checked as decoder.onnx is (check_graph,
    through the runtime's StaticDecoderSession on `device`); returns its largest logit difference."""
    export_decoder_mindir(ms_decoder(weights, cfg), capacity, path)  # the Decoder is not kept for the check
    return check_graph(path, cfg, cache, reference, session=StaticDecoderSession(path, cache, capacity, device))


def ms_decoder(weights: dict, cfg: DecoderConfig):
    """builder.models.decoder.Decoder holding `weights` (transformers' names with or without "model.")."""
    decoder = Decoder(cfg)
    names = {name for name, _ in decoder.parameters_and_names()}
    w = llama_weights(weights)
    missing = sorted(names - set(w))
    if missing:
        raise ExportError(f"decoder weights: no {missing[0]!r} ({len(missing)} of the decoder's tensors missing)")
    return frozen(decoder, {name: w[name] for name in names})


INT8_BLOCK = 32  # weights and activations quantized per block of 32 along K, as llama.cpp's Q8_0


def quantize_decoder(fp32: Path, int8: Path) -> None:
    """decoder.int8.onnx: every projection and the LM head as MatMulNBits, 8-bit weights with one scale per
    block of 32 inputs, activations quantized per block of 32 at run time (builder.graphs.quantize.blockwise_weights).

    Chosen on SmolLM2 by bench/experiments/int8_decoder.py (docs/decoders.md): onnxruntime's dynamic
    quantization (one activation scale per call, per-column weights) agreed with fp32's next token at 90.5%
    of steps, as SwiGLU's outliers flatten every other activation of the row; per-block scales agree at
    96-97% at the same speed, and with the head quantized too (a transposed int8 copy of the tied table, the
    embedding Gather keeping fp32) decoding is faster again, as the head is the largest matrix each token
    reads.  Each row's scales are its own, so no prompt's tokens depend on its batch."""
    model = onnx.load(str(fp32))
    head_as_matmul(model)
    blockwise_weights(model, int8, bits=8, block_size=INT8_BLOCK)


def head_as_matmul(model) -> None:
    """The head's Gemm(x, table, transB=1) as MatMul(x, table^T) over a copy of the table, in place: the block
    quantizer takes MatMuls by a [K, N] constant (the tied table itself stays for the embedding Gather)."""
    node = next(n for n in model.graph.node if n.name == LM_HEAD_NODE)
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1]))
    transposed = numpy_helper.from_array(np.ascontiguousarray(table.T), node.input[1] + ".T")
    model.graph.initializer.append(transposed)
    index = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(index, helper.make_node("MatMul", [node.input[0], transposed.name], list(node.output),
                                                    name=LM_HEAD_NODE))


def probe_batches(cfg: DecoderConfig, seed: int = 0):
    """Right-padded random id batches (int64 ids, mask), as a batch of prompts of different lengths is; the first
    row of each fills it."""
    return ragged_batches(np.random.RandomState(seed), PARITY_SHAPES, cfg.vocab_size, cfg.pad_token_id, np.int64,
                          shortest=2, first_full=True)


def check_graph(path: Path, cfg: DecoderConfig, cache: dict, reference: Callable | None,
                tolerance: float | None = PARITY_TOLERANCE, session=None) -> float:
    """Max |logit difference| of the graph at `path` from `reference` (or, without one, of prefill + decode
    from one pass through the same graph), over the probes: each row's last token's logits, after a prefill
    of all the tokens and after a prefill of all but the last then one decode step.  Raises ExportError
    beyond `tolerance` x the logits' scale (None: record only).  `session`: the runtime's session of the
    graph (default: an onnxruntime DecoderSession); all have DecoderSession's interface and meaning."""
    session = session or DecoderSession(path, cache)
    worst, scale = 0.0, 1.0
    for ids, mask in probe_batches(cfg):
        rows = np.arange(len(ids))
        last = mask.sum(1) - 1
        whole = session.prefill(ids, mask)[0]
        if reference is not None:
            expected = np.asarray(reference(ids, mask), np.float64)[rows, last]
        else:
            expected = whole.astype(np.float64)
        scale = max(scale, float(np.abs(expected).max()))
        worst = max(worst, float(np.abs(whole - expected).max()))
        # The last token of each row through the cache: prefill the rest (the row's last token masked out),
        # then decode it at its own position.
        head_mask = mask.copy()
        head_mask[rows, last] = 0
        _, present = session.prefill(ids, head_mask)
        step_ids = ids[rows, last][:, None]
        p = session.prompt_length
        full_mask = np.concatenate([np.ones((len(ids), p), np.int64), head_mask, np.ones((len(ids), 1), np.int64)], 1)
        stepped, _ = session.run(step_ids, (p + last)[:, None], full_mask, present)
        worst = max(worst, float(np.abs(stepped - expected).max()))
    if not np.isfinite(worst) or (tolerance is not None and worst > tolerance * scale):
        raise ExportError(f"{path.name}: logits differ from the reference by {worst:.2e}"
                          f" (> {tolerance} x {scale:.1f}, the largest logit)")
    return worst
