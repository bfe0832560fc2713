"""The MindIR graph of a generation bundle: the training Decoder (builder.models.decoder) over a static KV cache.

MindSpore's GraphCell prepares a graph for each input shape it meets
(runtime.mindspore_backend pads classifier batches to multiples of 8 for
that reason).  decoder.onnx's cache grows by one position per token, so
there every decode step would be a new shape and a new compile.  This graph
keeps the cache at a fixed capacity C instead, as Ascend deployments of LLMs
do (a static KV cache: MindFormers' before paged attention, transformers'
StaticCache): every decode step has the same shapes, [batch, 1] tokens over
[batch, kv_heads, C, head_dim] caches, and prefill pads its tokens to a few
lengths (runtime.mindspore_generate).  Its signature
(runtime.format.static_decoder_signature):

    input_ids        int32   [batch, seq]
    position_ids     int32   [batch, seq]      rotary positions (the text starts at P, the prompt cache's length)
    cache_position   int32   [seq]             the slot each new token's key and value are written to
    attention_mask   int32   [batch, C]        1 = the slot holds a key to attend to, after this call's writes
    key_cache.{i}, value_cache.{i}  float32 [batch, kv_heads, C, head_dim]  per layer i, in that order
 -> logits           float32 [batch, vocab]    at each row's last attended new token
    key_cache.{i}, value_cache.{i}  the caches with the new tokens' keys and values written at cache_position

A slot is an index of decoder.onnx's cache: the prompt cache fills slots
0..P-1 and each call's tokens take the slots after the last call's
(`cache_position` is transformers' StaticCache name for the same input).
New token j sees slot k when k <= cache_position[j] and the mask lets it:
the ONNX graph's rule (key index <= past + j), so one runtime sequence of
calls means the same thing to both graphs and one parity check serves both.

The write is a gather and a select: each slot takes the new key of the
token written to it (ops.gather by the slot's source token), or keeps its
own (ops.where on whether any token writes it).  No arithmetic touches a
cached value, so the write is exact on every device; a one-hot matmul
would pass the whole cache through a matmul, whose float32 precision is the
device's choice, and a Scatter needs indices over every axis.  A padded
prefill writes its padding tokens into the slots after the text, masked;
the decode steps that follow overwrite them one by one.  A slot past C is
not written at all (the runtime never pads that far).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..models.decoder import Decoder
from ..models.onnx_ops import MASK_FILL


class StaticCacheDecoder(nn.Cell):
    """A Decoder as one step of generation over a cache of `capacity` slots (the module docstring's signature)."""

    def __init__(self, decoder: Decoder, capacity: int):
        super().__init__()
        self.decoder = decoder
        self.layer_count = decoder.config.num_layers
        self.slots = Tensor(np.arange(capacity, dtype=np.int32))  # [C]

    def construct(self, input_ids, position_ids, cache_position, attention_mask, *caches):
        decoder = self.decoder
        cos = ops.gather(decoder.cos, position_ids, 0).expand_dims(1)  # [b, 1, s, head_dim]: rows by position
        sin = ops.gather(decoder.sin, position_ids, 0).expand_dims(1)
        hits = ops.equal(cache_position.expand_dims(1), self.slots.expand_dims(0)).astype(ms.int32)  # [s, C]
        written = hits.sum(0) > 0  # [C]: slots this call writes
        source = hits.argmax(0)  # [C]: the new token written there (0 where none; masked by `written`)
        bias = self.mask_bias(attention_mask, cache_position)
        x = decoder.embed(input_ids)
        out = ()
        for i in range(self.layer_count):
            layer = decoder.layers[i]
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            k, v = attn.keys_values(h, cos, sin)
            keys = write(caches[2 * i], k, source, written)
            values = write(caches[2 * i + 1], v, source, written)
            x = layer.feed_forward(x + attn.attend(attn.query(h, cos, sin), keys, values, bias))
            out = out + (keys, values)
        last = (x * self.last_token(attention_mask, cache_position).expand_dims(2)).sum(1)  # [b, h]
        return (decoder.logits(decoder.norm(last)),) + out

    def mask_bias(self, attention_mask, cache_position):
        """[b, 1, s, C]: a slot is hidden from new token j if the mask says so or it comes after j's own slot."""
        keys = (1.0 - attention_mask.astype(ms.float32)) * MASK_FILL  # [b, C]
        after = self.slots.expand_dims(0) > cache_position.expand_dims(1)  # [s, C]
        causal = after.astype(ms.float32) * MASK_FILL
        return keys.expand_dims(1).expand_dims(1) + causal.expand_dims(0).expand_dims(0)

    def last_token(self, attention_mask, cache_position):
        """[b, s] float one-hot of each row's last attended new token (the one in the highest attended slot):
        the logits are read there only, as decoder.onnx reads them (the LM head over every token is wasted)."""
        attended = ops.gather(attention_mask, cache_position, 1)  # [b, s]: the mask at each new token's slot
        score = attended * (cache_position + 1).expand_dims(0)  # 0 for tokens not attended
        best = score.max(1, keepdims=True)
        return ((score == best) & (attended > 0)).astype(ms.float32)


def write(cache, new, source, written):
    """`cache` [b, kv, C, d] with slot c replaced by `new`[:, :, source[c]] where `written`[c]: exact, no arithmetic."""
    return ops.where(written.reshape(1, 1, -1, 1), ops.gather(new, source, 2), cache)


def export_decoder_mindir(decoder: Decoder, capacity: int, path: Path) -> Path:
    """decoder.mindir: dynamic batch and sequence, the cache's capacity fixed (the point of a static cache)."""
    cfg = decoder.config
    net = StaticCacheDecoder(decoder, capacity)
    net.set_train(False)
    tokens = Tensor(shape=[None, None], dtype=ms.int32)
    cache = Tensor(shape=[None, cfg.num_kv_heads, capacity, cfg.head_dim], dtype=ms.float32)
    ms.export(net, tokens, tokens, Tensor(shape=[None], dtype=ms.int32), Tensor(shape=[None, capacity], dtype=ms.int32),
              *([cache] * (2 * cfg.num_layers)), file_name=str(Path(path).with_suffix("")), file_format="MINDIR")
    return Path(path)
