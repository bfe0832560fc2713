"""Generate text with a generation bundle: the decoder graph, its prompt cache, the tokenizer.

    from ptbundle.runtime import Bundle
    bundle = Bundle.load("exports/smollm2-chat")
    print(bundle.generate("What is a prompt?", max_new_tokens=64).text)
    for piece in bundle.generate("Tell me a story.", stream=True):
        print(piece, end="", flush=True)

One prompt at a time: the template (chat markup) and the prompt are
tokenized apart and joined as ids (runtime.template, as every bundle encodes
its inputs); the cache starts as the bundle's prompt
cache (P positions), the prompt's tokens take positions P, P+1, ... in one
prefill call, then each new token is one decode call over the growing cache.
Generation stops at an eos id (the manifest lists them), at a stop string
(which is not part of the output) or after max_new_tokens.  Text comes out
in pieces that never split a UTF-8 character, however byte-level BPE cut it.
Imports onnxruntime, numpy and tokenizers only.

`DecoderSession` runs decoder.onnx; with backend="mindspore" the Generator
drives runtime.mindspore_generate's StaticDecoderSession (decoder.mindir, a
cache of fixed capacity) through the same interface, and a prompt must then
fit that capacity as well as the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from .errors import BundleError, InputError
from .format import (DECODER_INPUTS, PROMPT_CACHE, Task, past_names, present_names, prompt_cache_names)
from .inputs import lone_surrogate
from .onnx_backend import session_options
from .template import Template
from .text import encode

REPLACEMENT = "\ufffd"  # what a byte-level decoder shows for the bytes of a character not yet complete


class DecoderSession:
    """decoder.onnx in onnxruntime, with the bundle's prompt cache in front of every call's cache."""

    capacity = None  # the cache grows with each call, up to the model's positions (StaticDecoderSession has one)

    def __init__(self, path: Path, prompt_cache: dict, threads: int | None = None):
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for unreadable graphs
            raise BundleError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from e
        inputs = [i.name for i in self.session.get_inputs()]
        self.layers = sum(1 for n in inputs if n.startswith("past_key."))
        expected = list(DECODER_INPUTS) + [n for i in range(self.layers) for n in past_names(i)]
        if sorted(inputs) != sorted(expected):
            raise BundleError(f"{path}: not a decoder graph (inputs {', '.join(inputs[:4])}, ...)")
        self.output_names = ["logits"] + [n for i in range(self.layers) for n in present_names(i)]
        prompt, self.prompt_length = prompt_arrays(prompt_cache, self.layers)
        self.cache = [a[None] for a in prompt]

    @classmethod
    def open(cls, path: Path, prompt_cache: dict, generation: dict, device: str) -> "DecoderSession":
        """How runtime.backends opens one for a bundle (the registry checked the device: CPU)."""
        return cls(path, prompt_cache)

    def run(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: list) -> tuple:
        """One call: (logits [batch, vocab], present caches in past_names order)."""
        feed = dict(zip(DECODER_INPUTS, (np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(positions, np.int64),
                                         np.ascontiguousarray(mask, np.int64))))
        feed.update(zip([n for i in range(self.layers) for n in past_names(i)], past))
        out = self.session.run(self.output_names, feed)
        return out[0], out[1:]

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> tuple:
        """The text `ids` [batch, seq] (`mask` 1 for its tokens, 0 for padding) after the prompt cache."""
        batch, seq = ids.shape
        p = self.prompt_length
        past = [np.ascontiguousarray(np.broadcast_to(a, (batch, *a.shape[1:]))) for a in self.cache]
        positions = np.broadcast_to(p + np.arange(seq, dtype=np.int64), (batch, seq))
        full_mask = np.concatenate([np.ones((batch, p), np.int64), np.asarray(mask, np.int64)], 1)
        return self.run(ids, positions, full_mask, past)


@dataclass
class Generation:
    """What generate returns: the text, the generated token ids, and why it stopped."""

    text: str = ""
    token_ids: list = field(default_factory=list)  # generated, eos excluded; a cut stop string's tokens included
    prompt_ids: list = field(default_factory=list)  # what the decoder was given after the prompt cache
    finish_reason: str = ""  # "eos", "stop" (a stop string) or "length" (max_new_tokens)


class TextStream:
    """Incremental detokenization: the text of each new token, held back while its last character is
    incomplete (byte-level BPE may cut a character's UTF-8 bytes across tokens).

    Decodes a short window (from the token before the last piece), not all tokens every step, so a long
    generation costs the same per token.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back when generation ends (an incomplete character shows as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class StopStrings:
    """Holds back text that could be the start of a stop string; cuts the text where one is complete."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple:
        """(text safe to emit, whether a stop string ended the generation)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generator:
    """A generation bundle's task, ready to run: decoder session, tokenizer, template, stopping rules."""

    def __init__(self, session: DecoderSession, tokenizer, task: Task):
        self.session, self.tokenizer, self.task = session, tokenizer, task
        gen = task.generation
        self.eos = set(gen["eos_token_ids"])
        self.positions = gen["max_positions"]
        if session.capacity is not None:  # a static cache (decoder.mindir) holds what it was built for
            self.positions = min(self.positions, session.capacity)
        self.context = self.positions - session.prompt_length  # positions left for prompt + new tokens
        if session.prompt_length != task.num_virtual_tokens:
            raise BundleError(f"{PROMPT_CACHE}: {session.prompt_length} prompt positions, the manifest says"
                              f" {task.num_virtual_tokens}")
        self.template = Template.parse(task.template) if task.template else None

    def encode(self, prompt: str) -> list:
        """The prompt's token ids inside the template, as every bundle encodes its inputs (runtime.text.encode:
        the template's pieces and the prompt tokenized apart and joined, whitespace kept as written)."""
        return encode(self.tokenizer, [prompt], None, self.template)[0].ids

    def check(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float) -> list:
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be a string, not {type(prompt).__name__}")
        bad = lone_surrogate(prompt)  # e.g. a command line's undecodable bytes: the tokenizer would raise
        if bad:
            raise InputError(f"the prompt holds a lone surrogate ({bad}): not valid Unicode text")
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise InputError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
        if not temperature >= 0:
            raise InputError(f"temperature must be 0 (greedy) or more, not {temperature!r}")
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], not {top_p!r}")
        ids = self.encode(prompt)
        if not ids:
            raise InputError("the prompt is empty (no tokens)")
        if len(ids) + max_new_tokens > self.context:
            static = self.positions < self.task.generation["max_positions"]
            where = "the static KV cache of decoder.mindir" if static else "the model's context"
            hint = (f"; backend='onnxruntime' has the model's {self.task.generation['max_positions']}, or rebuild"
                    f" with a larger pt-build instruct --mindir-capacity") if static else ""
            raise InputError(f"the prompt's {len(ids)} tokens + max_new_tokens {max_new_tokens} ="
                             f" {len(ids) + max_new_tokens} exceed {where} of {self.context} tokens"
                             f" ({self.positions} positions, {self.session.prompt_length} taken by the learned"
                             f" prompt{hint})")
        return ids

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop=(), result: Generation | None = None) -> Iterator[str]:
        """Text pieces as they come; `result` (if given) is filled in as generation goes."""
        ids = self.check(prompt, max_new_tokens, temperature, top_p)  # before any work, not at the first next()
        return self._stream(ids, max_new_tokens, temperature, top_p, seed, stop,
                            result if result is not None else Generation())

    def _stream(self, ids, max_new_tokens, temperature, top_p, seed, stop, result) -> Iterator[str]:
        result.prompt_ids = list(ids)
        rng = np.random.default_rng(seed)
        text, stops = TextStream(self.tokenizer), StopStrings([stop] if isinstance(stop, str) else stop)
        p, n = self.session.prompt_length, len(ids)
        logits, cache = self.session.prefill(np.array([ids], np.int64), np.ones((1, n), np.int64))
        result.finish_reason = "length"
        for step in range(max_new_tokens):
            token = pick(logits[0], temperature, top_p, rng)
            if token in self.eos:
                result.finish_reason = "eos"
                break
            result.token_ids.append(token)
            piece, stopped = stops.push(text.push(token))
            if piece:
                result.text += piece
                yield piece
            if stopped:
                result.finish_reason = "stop"
                return
            if step + 1 == max_new_tokens:
                break
            position = p + n + step
            logits, cache = self.session.run(np.array([[token]], np.int64), np.array([[position]], np.int64),
                                             np.ones((1, position + 1), np.int64), cache)
        rest, stopped = stops.push(text.flush())
        if stopped:
            result.finish_reason = "stop"
        else:
            rest += stops.flush()
        if rest:
            result.text += rest
            yield rest

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop=(), callback: Callable | None = None) -> Generation:
        result = Generation()
        for piece in self.stream(prompt, max_new_tokens, temperature, top_p, seed, stop, result):
            if callback is not None:
                callback(piece)
        return result


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The next token: argmax at temperature 0, else a sample from the tempered softmax, cut to the smallest
    set of tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
        return int(keep[rng.choice(len(keep), p=probs[keep] / probs[keep].sum())])
    return int(rng.choice(len(probs), p=probs))


def prompt_arrays(prompt_cache: dict, layers: int) -> tuple:
    """(the prompt cache's arrays in the graphs' cache order, key.0, value.0, key.1, ..., each float32
    [kv_heads, P, head_dim]; P): what every session's cache starts with."""
    try:
        arrays = [np.ascontiguousarray(prompt_cache[name], np.float32)
                  for i in range(layers) for name in prompt_cache_names(i)]
    except KeyError as e:
        raise BundleError(f"{PROMPT_CACHE}: no {e.args[0]!r} for this {layers}-layer decoder") from None
    lengths = {a.shape[1] for a in arrays}
    if len(lengths) != 1:
        raise BundleError(f"{PROMPT_CACHE}: layers differ in prompt length ({sorted(lengths)})")
    return arrays, lengths.pop()


def read_prompt_cache(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own types for a damaged file
        raise BundleError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from e
