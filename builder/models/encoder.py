"""A BERT / RoBERTa encoder in plain MindSpore.

One file, read top to bottom: embeddings, attention, feed-forward, the layer stack
(`PromptClassifier` in builder.models.classifier puts a prompt and a head on it).  Everything here runs in GRAPH_MODE and
exports to MindIR with dynamic batch and sequence axes.

The prompt follows PEFT's prompt tuning exactly, so adapters interoperate:
the virtual tokens go *before* [CLS]/<s>, the attention mask gets a prefix of
ones, token types a prefix of zeros, and position embeddings count the prompt
positions too.
"""

from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops

from ..backbones.configs import EncoderConfig
from .onnx_ops import MASK_FILL


class LayerNormInputGrad(nn.Cell):
    """layer_norm(x, gamma, beta) over the last axis, whose backward pass gives x's gradient only.

    The encoder is frozen, so gamma's and beta's gradients are thrown away;
    MindSpore's CPU LayerNormGrad computes them anyway, slowly: about a sixth
    of a train step (bench/perf/profile_step.py).  `bprop` computes the input
    gradient alone.  (A bprop may not read Parameters, hence gamma and
    beta come in as arguments.)
    """

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x, gamma, beta):
        return self.norm(x, gamma, beta)[0]

    def bprop(self, x, gamma, beta, out, dout):
        shape, h = x.shape, x.shape[-1]
        x, dout = x.reshape(-1, h), dout.reshape(-1, h)
        # Row means as a product with a column of 1/h: with ReduceMean here
        # instead, the backward cost as much as the LayerNormGrad it replaces
        # (MindSpore's CPU reductions are slow; its GEMV is not).
        average = ops.ones((h, 1), x.dtype) / h
        centered = x - ops.matmul(x, average)
        rstd = ops.rsqrt(ops.matmul(centered * centered, average) + self.eps)
        xhat = centered * rstd
        g = dout * gamma
        dx = rstd * (g - ops.matmul(g, average) - xhat * ops.matmul(g * xhat, average))
        return dx.reshape(shape), ops.zeros_like(gamma), ops.zeros_like(beta)


class FrozenLayerNorm(nn.Cell):
    """The encoder's LayerNorm: checkpoint gamma and beta, never trained."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.gamma = Parameter(np.ones(hidden, np.float32), name="gamma")
        self.beta = Parameter(np.zeros(hidden, np.float32), name="beta")
        self.norm = LayerNormInputGrad(eps)

    def construct(self, x):
        return self.norm(x, self.gamma, self.beta)


def gelu(x):
    """GELU with the exact erf, as BERT uses it.

    Written out rather than ops.gelu: that one divides by sqrt 2, and on
    CPU the division and its gradient are slow (Div in bench/perf/profile_step.py).
    """
    return x * (0.5 + 0.5 * ops.erf(x * (1.0 / math.sqrt(2.0))))


class TrainDropout(nn.Cell):
    """Dropout while training, the identity until `set_rate` (before the first compile: graph mode reads the
    rate as a constant) and at inference.  nn.Dropout fixes its rate when built, so this builds one then."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Identity()

    def set_rate(self, p: float) -> None:
        self.drop = nn.Dropout(p=p) if p > 0 else nn.Identity()

    def construct(self, x):
        return self.drop(x)


class Embeddings(nn.Cell):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.word = Parameter(np.zeros((cfg.vocab_size, h), np.float32), name="word")
        self.position = Parameter(np.zeros((cfg.max_positions, h), np.float32), name="position")
        self.use_types = cfg.type_vocab_size > 0
        if self.use_types:
            self.token_type = Parameter(np.zeros((cfg.type_vocab_size, h), np.float32), name="token_type")
        self.norm = FrozenLayerNorm(h, cfg.layer_norm_eps)
        self.offset = cfg.position_offset
        self.dropout = TrainDropout()  # Encoder.set_dropout: BERT's places, while training only

    def construct(self, inputs_embeds, token_type_ids, shift: int = 0):
        """`shift`: positions start that many rows later (a prefix's length, as transformers counts a cache)."""
        seq = inputs_embeds.shape[1]
        start = self.offset + shift
        # Slicing the table (not cumsum over the mask) keeps the graph ONNX-exportable.
        return self.finish(inputs_embeds + self.position[start : start + seq], token_type_ids)

    def finish(self, x, token_type_ids):
        """Token types and LayerNorm over embeddings that have their positions (MultiTaskClassifier gives its own)."""
        if self.use_types:  # a constant: graph mode compiles one branch
            x = x + ops.gather(self.token_type, token_type_ids, 0)
        return self.dropout(self.norm(x))


class Attention(nn.Cell):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_heads
        self.head_dim = h // cfg.num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Dense(h, 3 * h)  # one GEMM for query, key and value
        self.out = nn.Dense(h, h)
        self.norm = FrozenLayerNorm(h, cfg.layer_norm_eps)
        self.probs_dropout = TrainDropout()
        self.dropout = TrainDropout()

    def construct(self, x, mask_bias, prefix_keys=None, prefix_values=None):
        """`prefix_keys` [b, heads, head_dim, P] and `prefix_values` [b, heads, P, head_dim] go in front of the
        layer's own (a prefix prompt); `mask_bias` then covers P + s keys."""
        b, s, h = x.shape
        # Splitting the last axis and reshaping to 4-D is 3x faster on CPU than
        # one 5-D reshape + transpose + index (measured: 53 vs 148 ms a layer);
        # split, unlike slicing, has a cheap gradient (a concat).
        q, k, v = ops.split(self.qkv(x), h, -1)
        q = q.reshape(b, s, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(b, s, self.heads, self.head_dim).transpose(0, 2, 3, 1)
        v = v.reshape(b, s, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        if prefix_keys is not None:
            k = ops.concat((prefix_keys, k), -1)
            v = ops.concat((prefix_values, v), 2)
        scores = ops.matmul(q, k) * self.scale + mask_bias
        ctx = ops.matmul(self.probs_dropout(ops.softmax(scores, -1)), v)
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, s, h)
        return self.norm(x + self.dropout(self.out(ctx)))


class FeedForward(nn.Cell):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.up = nn.Dense(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Dense(cfg.intermediate_size, cfg.hidden_size)
        self.norm = FrozenLayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.dropout = TrainDropout()

    def construct(self, x):
        return self.norm(x + self.dropout(self.down(gelu(self.up(x)))))


class Layer(nn.Cell):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.ffn = FeedForward(cfg)

    def construct(self, x, mask_bias, prefix_keys=None, prefix_values=None):
        return self.ffn(self.attention(x, mask_bias, prefix_keys, prefix_values))


class Encoder(nn.Cell):
    """The transformer body: embeddings and layers, taking embeddings as input."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.CellList([Layer(cfg) for _ in range(cfg.num_layers)])

    def set_dropout(self, p: float) -> None:
        """Dropout at BERT's places (embeddings, attention probabilities, both residual branches) while
        training: the frozen encoder as transformers and PEFT train it.  Set before the first compile (graph
        mode reads `p` as a constant); at inference (set_train(False)) every one is the identity, and so in the
        layers below a late prompt or a higher prefix, which training computes once (builder.training.forward.LayerCache)."""
        for _, cell in self.cells_and_names():
            if isinstance(cell, TrainDropout):
                cell.set_rate(p)

    def construct(self, inputs_embeds, attention_mask, token_type_ids):
        return self.run_layers(self.embeddings(inputs_embeds, token_type_ids), attention_mask)

    def run_layers(self, x, attention_mask):
        mask_bias = attention_bias(attention_mask)
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x


def attention_bias(attention_mask):
    """[b, s] -> [b, 1, 1, s]; masked keys get a large negative score."""
    return (1.0 - attention_mask.astype(ms.float32)).expand_dims(1).expand_dims(1) * MASK_FILL

