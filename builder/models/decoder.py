"""A Llama-family causal decoder in plain MindSpore: RMSNorm, rotary positions, SwiGLU, grouped-query attention.

One file, read top to bottom, as builder/models/encoder.py is for encoders.  The
parameter names are transformers' `LlamaForCausalLM` names without the
leading "model." (`layers.0.self_attn.q_proj.weight`, `norm.weight`,
`embed_tokens.weight`), so the architecture's weight map is short and a
reader can hold the two side by side.  `lm_head` is the embedding table when
the checkpoint ties them (SmolLM2 does).

Prompts keep PEFT's CAUSAL_LM semantics: a shallow prompt is P vectors in
front of the token embeddings at positions 0..P-1; a prefix is P keys and
values in front of every layer's own, the text's positions starting at P
(transformers counts a cache's length into the positions).  Either way the
prompt's keys and values at every layer do not depend on the text, since a
causal model's tokens see only what precedes them: `prompt_cache` computes
them once, and a generation bundle starts its KV cache with them.
"""

from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..backbones.configs import DecoderConfig
from ..errors import RecipeError
from .classifier import HeadState, TableShape, TaskTableError, TaskTableNet, is_rows
from .device import eager
from .onnx_ops import MASK_FILL
from .prompts import PROMPTS, PromptSpec



class RMSNorm(nn.Cell):
    """x / rms(x) * weight, Llama's norm (no mean, no bias); frozen."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = Parameter(np.ones(hidden, np.float32), name="weight")
        self.eps = eps
        # The mean of squares as a product with a column of 1/h: MindSpore's CPU
        # reductions are slow, its GEMV is not (as model.LayerNormInputGrad).
        self.average = Tensor(np.full((hidden, 1), 1.0 / hidden, np.float32))

    def construct(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        rms = ops.rsqrt(ops.matmul(flat * flat, self.average) + self.eps)
        return (flat * rms).reshape(shape) * self.weight


def rotary_tables(cfg: DecoderConfig) -> tuple:
    """cos and sin of position x inverse frequency, [max_positions, head_dim / 2], as transformers' default
    rotary embedding computes them (float32 inverse frequencies; the angles in float64, a hair closer).  The
    MindSpore Decoder repeats them to head_dim; the ONNX graphs (builder.graphs.onnx_decoder) take them as they are."""
    d = cfg.head_dim
    inv_freq = (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))).astype(np.float32)
    angles = np.arange(cfg.max_positions, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate(x, cos, sin):
    """transformers' apply_rotary_pos_emb on one of q or k: [b, heads, s, d] with cos/sin [s, d]."""
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


class DecoderAttention(nn.Cell):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.scale = 1.0 / math.sqrt(d)
        # Qwen2 adds biases to q, k and v (not o); they go in before the rotation, as transformers does
        self.q_proj = nn.Dense(h, cfg.num_heads * d, has_bias=cfg.qkv_bias)
        self.k_proj = nn.Dense(h, cfg.kv_width, has_bias=cfg.qkv_bias)
        self.v_proj = nn.Dense(h, cfg.kv_width, has_bias=cfg.qkv_bias)
        self.o_proj = nn.Dense(cfg.num_heads * d, h, has_bias=False)

    def keys_values(self, x, cos, sin):
        """This layer's keys (rotated) and values of `x` [b, s, h]: [b, kv_heads, s, head_dim] each, what a cache holds."""
        b, s, _ = x.shape
        k = self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        return rotate(k, cos, sin), v

    def construct(self, x, mask_bias, cos, sin, past_keys=None, past_values=None):
        """`past_keys`/`past_values` [b, kv_heads, P, head_dim] go in front of the layer's own (a prefix, or the
        cache of a prompt); `mask_bias` [b, 1, s, P + s] covers them."""
        k, v = self.keys_values(x, cos, sin)
        if past_keys is not None:
            k = ops.concat((past_keys, k), 2)
            v = ops.concat((past_values, v), 2)
        return self.attend(self.query(x, cos, sin), k, v, mask_bias)

    def query(self, x, cos, sin):
        """The rotated queries of `x` [b, s, h]: [b, heads, s, head_dim]."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        return rotate(q, cos, sin)

    def attend(self, q, k, v, mask_bias):
        """Queries [b, heads, s, d] over keys and values [b, kv_heads, t, d] (`mask_bias` [b, 1, s, t]), through
        o_proj: [b, s, hidden].  Also the static-cache graph's (builder.graphs.mindir_decoder), whose t is its capacity."""
        b, _, s, _ = q.shape
        if self.group > 1:  # grouped-query attention: query head i reads kv head i // group, as repeat_kv does
            t = k.shape[2]
            k = ops.broadcast_to(k.expand_dims(2), (b, self.kv_heads, self.group, t, self.head_dim)) \
                .reshape(b, self.heads, t, self.head_dim)
            v = ops.broadcast_to(v.expand_dims(2), (b, self.kv_heads, self.group, t, self.head_dim)) \
                .reshape(b, self.heads, t, self.head_dim)
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * self.scale + mask_bias
        ctx = ops.matmul(ops.softmax(scores, -1), v)
        return self.o_proj(ctx.transpose(0, 2, 1, 3).reshape(b, s, self.heads * self.head_dim))


class SwiGLU(nn.Cell):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Dense(cfg.hidden_size, cfg.intermediate_size, has_bias=False)
        self.up_proj = nn.Dense(cfg.hidden_size, cfg.intermediate_size, has_bias=False)
        self.down_proj = nn.Dense(cfg.intermediate_size, cfg.hidden_size, has_bias=False)

    def construct(self, x):
        gate = self.gate_proj(x)
        return self.down_proj(gate * ops.sigmoid(gate) * self.up_proj(x))


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def construct(self, x, mask_bias, cos, sin, past_keys=None, past_values=None):
        x = x + self.self_attn(self.input_layernorm(x), mask_bias, cos, sin, past_keys, past_values)
        return self.feed_forward(x)

    def feed_forward(self, x):
        """The layer's second residual block (after attention): what builder.graphs.mindir_decoder shares with construct."""
        return x + self.mlp(self.post_attention_layernorm(x))

    def keys_values(self, x, cos, sin):
        """What this layer's cache holds for states `x` entering it."""
        return self.self_attn.keys_values(self.input_layernorm(x), cos, sin)

    def last_row(self, x, pick, mask_bias, cos, sin, past_keys=None, past_values=None):
        """construct's output at one position of each row, `pick` [b, s, 1] (one-hot): [b, 1, hidden].

        The keys and values still come from every position; the query, the
        attention and the feed-forward run for that row alone.  A classifier
        reads nothing else from its last layer, so this saves about 90% of
        that layer (a tenth of training a prefix on SmolLM2's layers 20-29).
        Products with a one-hot and sums select exactly."""
        attn = self.self_attn
        h = self.input_layernorm(x)
        k, v = attn.keys_values(h, cos, sin)
        if past_keys is not None:
            k = ops.concat((past_keys, k), 2)
            v = ops.concat((past_values, v), 2)
        b = x.shape[0]
        # cos/sin: [s, head_dim], or [b, 1, s, head_dim] when each row has positions of its own (DecoderMultiTask)
        cos_rows, sin_rows = (cos.expand_dims(0), sin.expand_dims(0)) if cos.ndim == 2 else (cos[:, 0], sin[:, 0])
        row_cos = (cos_rows * pick).sum(1).reshape(b, 1, 1, -1)  # [b, 1, 1, head_dim]: its position's
        row_sin = (sin_rows * pick).sum(1).reshape(b, 1, 1, -1)
        q = rotate(attn.q_proj((h * pick).sum(1, keepdims=True)).reshape(b, 1, attn.heads, attn.head_dim)
                   .transpose(0, 2, 1, 3), row_cos, row_sin)
        row_bias = (mask_bias * pick.expand_dims(1)).sum(2, keepdims=True)  # [b, 1, 1, keys]
        return self.feed_forward((x * pick).sum(1, keepdims=True) + attn.attend(q, k, v, row_bias))


class Table(nn.Cell):
    """A bare [rows, hidden] Parameter under the name `weight` (embed_tokens.weight, lm_head.weight)."""

    def __init__(self, rows: int, hidden: int):
        super().__init__()
        self.weight = Parameter(np.zeros((rows, hidden), np.float32), name="weight")


class Decoder(nn.Cell):
    """The Llama body and LM head; inputs are embeddings, so a prompt can go in front of the tokens'."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Table(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.CellList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = Table(cfg.vocab_size, cfg.hidden_size)
        cos, sin = rotary_tables(cfg)  # [positions, head_dim / 2]: rotate_half pairs dims i and i + head_dim / 2
        self.cos, self.sin = Tensor(np.concatenate([cos, cos], -1)), Tensor(np.concatenate([sin, sin], -1))
        # Not a [max, max] triangle: SmolLM2's 8,192 positions would make it 268 MB.
        self.index = Tensor(np.arange(cfg.max_positions, dtype=np.float32))

    def output_table(self):
        """The LM head's [vocab, hidden] matrix (the embeddings, when tied)."""
        return self.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def embed(self, input_ids):
        return ops.gather(self.embed_tokens.weight, input_ids, 0)

    def positions(self, start: int, s: int) -> tuple:
        return self.cos[start : start + s], self.sin[start : start + s]

    def mask_bias(self, attention_mask, past: int):
        """[b, 1, s, past + s]: padding keys hidden, each text position sees the past and the text up to itself.

        `attention_mask` [b, s] covers the text only; the past (a prompt) is visible to every position."""
        b, s = attention_mask.shape
        keys = (1.0 - attention_mask.astype(ms.float32)) * MASK_FILL  # [b, s]
        index = self.index[:s]
        causal = (index.expand_dims(0) > index.expand_dims(1)).astype(ms.float32) * MASK_FILL  # key after query
        if past > 0:
            keys = ops.concat((ops.zeros((b, past), ms.float32), keys), 1)
            causal = ops.concat((ops.zeros((s, past), ms.float32), causal), 1)
        return keys.expand_dims(1).expand_dims(1) + causal.expand_dims(0).expand_dims(0)

    def construct(self, embeds, attention_mask):
        """Final hidden states [b, s, h] (after the last norm) of embeddings [b, s, h]; positions from 0."""
        cos, sin = self.positions(0, embeds.shape[1])
        x = embeds
        bias = self.mask_bias(attention_mask, 0)
        for layer in self.layers:
            x = layer(x, bias, cos, sin)
        return self.norm(x)

    def logits(self, hidden):
        return ops.matmul(hidden, self.output_table().T)



# --- classification through the LM head ---------------------------------------------------------------------------

def last_token_rows(mask):
    """[b, s] mask -> [b, s] float one-hot of each row's last unmasked position (right padding)."""
    after = ops.concat((mask[:, 1:], ops.zeros((mask.shape[0], 1), mask.dtype)), 1)
    return (mask - after).astype(ms.float32)


class DecoderClassifier(HeadState, nn.Cell):
    """Prompt + frozen causal LM + its label words: PET-style classification, the answer slot at the text's end.

    inputs:  input_ids, attention_mask, token_type_ids (int32 [batch, seq]; token types are ignored)
    output:  logits [batch, num_labels]

    The same interface as builder.models.classifier.PromptClassifier (head_params, folded,
    lower / upper_features for training with cached lower layers), so
    training, export and the runtime treat both alike.  The
    text is read at its last token (a template ends with the words before
    the answer, "... The sentiment is"), through the final norm, by the
    label words' rows of the LM head.
    """

    family = "decoder"  # builder.families

    def __init__(self, decoder: Decoder, num_labels: int, spec: PromptSpec | None = None):
        super().__init__()
        cfg = decoder.config
        self.decoder = decoder
        self.spec = spec or PromptSpec()
        if not PROMPTS[self.spec.method].decoders:
            takes = [name for name, method in PROMPTS.items() if method.decoders and name != "none"]
            raise RecipeError(f"--method {self.spec.method}: a decoder takes {', '.join(takes)}")
        self.prompt = PROMPTS[self.spec.method](cfg, self.spec)  # builder.models.prompts, laid out for kv heads
        self.num_virtual_tokens = self.spec.virtual_tokens
        self.prompt_method = self.spec.method
        self.split = self.prompt.first_layer
        self.layer_count = cfg.num_layers
        self.hidden_size = cfg.hidden_size
        self.pooling, self.normalize = "last", False
        # The verbalizer: label i's score is the LM head's logit of its words at the answer position.  Only the
        # label words' rows of the output matrix are in the graph (the mean of a label's words' rows when it has
        # several, builder.families.decoder.label_rows), plus a bias: zero-shot, minus the label's mean log-probability
        # (builder.training.hard.lm_zero_shot_head); with a soft prompt, learned.  PromptClassifier's head names, so
        # training, prompt.safetensors and the runtime need nothing new.
        self.classifier = nn.Dense(cfg.hidden_size, num_labels)

    def construct(self, input_ids, attention_mask, token_type_ids):
        return self.head(self.features(input_ids, attention_mask, token_type_ids))

    def head(self, features):
        return self.classifier(features)

    def features(self, input_ids, attention_mask, token_type_ids):
        states, mask = self.lower(input_ids, attention_mask, token_type_ids)
        return self.upper_features(states, mask)

    def start(self) -> int:
        """The first position of the sequence the layers see: 0 (a shallow prompt's tokens come first), or after
        a prefix's P cached positions.  The text itself starts at spec.positions()."""
        return self.prompt.layout(self.spec)[1]

    def lower(self, input_ids, attention_mask, token_type_ids):
        """(states entering layer `split`, their mask): what a prefix starting higher never changes."""
        embeds, mask, _ = self.prompt(self.decoder.embed(input_ids), attention_mask, token_type_ids)
        x = embeds
        if self.split > 0:
            cos, sin = self.decoder.positions(self.start(), x.shape[1])
            bias = self.decoder.mask_bias(mask, 0)
            for i in range(self.split):
                x = self.decoder.layers[i](x, bias, cos, sin)
        return x, mask

    def upper_features(self, x, mask):
        """Layers from `split` on, with the prompt; the final norm of each row's last token [b, hidden]."""
        b = x.shape[0]
        cos, sin = self.decoder.positions(self.start(), x.shape[1])
        p = self.num_virtual_tokens if self.prompt.has_keys_values else 0
        bias = self.decoder.mask_bias(mask, p)
        table = self.prompt.table()
        pick = last_token_rows(mask).expand_dims(2)  # [b, s, 1]: each row's last text token, the answer slot
        for i in range(self.split, self.layer_count):
            past = ()
            if self.prompt.has_keys_values:
                keys, values = self.prompt.keys_values(table, i, b)  # keys as the encoder holds them: [b, kv, d, P]
                past = (keys.transpose(0, 1, 3, 2), values)
            if i < self.layer_count - 1:
                x = self.decoder.layers[i](x, bias, cos, sin, *past)
            else:  # the last layer for the answer slot alone
                x = self.decoder.layers[i].last_row(x, pick, bias, cos, sin, *past)
        return self.decoder.norm(x[:, 0])  # a prompt starts below the last layer (builder.models.prompts checks --layer)

    def head_params(self) -> dict:
        return {"classifier.weight": self.classifier.weight, "classifier.bias": self.classifier.bias,
                **self.prompt.params()}

    def folded(self) -> "DecoderClassifier":
        if not self.spec.projection:
            return self
        net = DecoderClassifier(self.decoder, self.classifier.weight.shape[0], self.spec.folded())
        net.load_head_state(self.folded_state())
        return net

    def prompt_cache(self) -> dict:
        """The prompt's keys and values at every layer it reaches, "key.{i}"/"value.{i}" -> [kv_heads, P, head_dim]
        (numpy): the start of a generation bundle's KV cache.  A prefix is its own cache; a shallow prompt's is computed
        once here (its positions 0..P-1 see nothing but each other)."""
        if self.prompt_method == "none":
            return {}
        cfg = self.decoder.config
        out = {}
        if self.prompt.has_keys_values:  # layers from `split` on: a prefix from layer k has none below
            table = self.prompt.table()
            for i in range(self.split, cfg.num_layers):
                keys, values = self.prompt.keys_values(table, i, 1)
                out[f"key.{i}"], out[f"value.{i}"] = keys.transpose(0, 1, 3, 2)[0].asnumpy(), values[0].asnumpy()
            return out
        return sequence_cache(self.decoder, self.prompt.params()["prompt_embeddings"].value())[1]


def sequence_cache(decoder: Decoder, embeds) -> tuple:
    """One sequence of embeddings [n, hidden] at positions 0..n-1 through the decoder: (the states entering each
    layer [n, hidden], its KV cache "key.{i}"/"value.{i}" -> [kv_heads, n, head_dim]), numpy."""
    # Eager: in graph mode each layer's call would compile that layer's graph (for SmolLM2 several times slower
    # than the eager pass, with the same numbers)
    with eager():
        x = embeds.expand_dims(0)
        n = x.shape[1]
        cos, sin = decoder.positions(0, n)
        bias = decoder.mask_bias(ops.ones((1, n), ms.int32), 0)
        states, cache = [], {}
        for i, layer in enumerate(decoder.layers):
            states.append(x[0].asnumpy())
            keys, values = layer.keys_values(x, cos, sin)
            cache[f"key.{i}"], cache[f"value.{i}"] = keys[0].asnumpy(), values[0].asnumpy()
            x = layer(x, bias, cos, sin)
    return states, cache



def decoder_table_shape(config, tasks: list) -> TableShape:
    """A decoder's TableShape of `tasks` (TaskHead): no slots; every prompt is keys and values, P of them (a
    shallow prompt's cache is as long as the prompt), from its first layer (a shallow prompt's: 0)."""
    prompted = [t for t in tasks if t.spec.virtual_tokens]
    return TableShape(0, max([t.spec.virtual_tokens for t in prompted], default=0), max(t.num_labels for t in tasks),
                      min([t.spec.layer for t in prompted], default=config.num_layers))


def decoder_task_tables(decoder: Decoder, tasks: list, values: list) -> dict:
    """Every task's prompt cache and head as stacked arrays (builder.models.classifier.task_tables' names and
    layout, with no slots: on a decoder every prompt is keys and values in front of the text's own).

    A task's cache is what its own classifier graph holds (DecoderClassifier.prompt_cache: a prefix's table,
    or a shallow prompt run once through the layers), Q keys at each layer from the first one any task's prompt
    reaches, right-aligned; `visible` [T, layers, Q] says which a row sees; `text_start` the position of its
    text's first token (the prompt's length: PEFT's positions).  Sizes: decoder_table_shape.
    """
    cfg = decoder.config
    layers = cfg.num_layers
    _, q, width, past_from = decoder_table_shape(cfg, tasks)
    caches, starts, firsts, heads = [], [], [], []
    for task, own in zip(tasks, values):
        if not PROMPTS[task.spec.method].decoders:
            raise TaskTableError(task.name, f"prompt method {task.spec.method!r} does not run on a decoder")
        starts.append(task.spec.positions())
        if is_rows(own):  # its rows of another merged bundle's tables: the cache and head as they are there
            cache, head = cache_of_rows(own, task.num_labels)
            caches.append(cache)
            heads.append(head)
            firsts.append(min([int(k.split(".")[1]) for k in cache], default=layers))
            continue
        heads.append(own)
        net = DecoderClassifier(decoder, task.num_labels, task.spec)
        try:
            net.load_head_state(own)
        except KeyError as e:
            raise TaskTableError(task.name, f"{e.args[0]}") from e
        except ValueError as e:
            raise TaskTableError(task.name, f"{e}") from e
        caches.append(net.prompt_cache())
        firsts.append(net.split if caches[-1] else layers)
    n = len(tasks)
    out = {"task.visible": np.zeros((n, layers, q), np.int32), "task.text_start": np.array(starts, np.int32),
           "task.classifier.weight": np.zeros((n, cfg.hidden_size, width), np.float32),
           "task.classifier.bias": np.zeros((n, width), np.float32)}
    for i in range(past_from, layers):
        out[f"task.past.{i}"] = np.zeros((2, n, cfg.num_kv_heads, q, cfg.head_dim), np.float32)
    for t, (task, cache, first, own) in enumerate(zip(tasks, caches, firsts, heads)):
        for i in range(first, layers):
            p = cache[f"key.{i}"].shape[1]
            out[f"task.past.{i}"][0, t, :, q - p :] = cache[f"key.{i}"]
            out[f"task.past.{i}"][1, t, :, q - p :] = cache[f"value.{i}"]
            out["task.visible"][t, i, q - p :] = 1
        out["task.classifier.weight"][t, :, : task.num_labels] = np.asarray(own["classifier.weight"], np.float32).T
        out["task.classifier.bias"][t, : task.num_labels] = own["classifier.bias"]
    return out


def cache_of_rows(rows: dict, num_labels: int) -> tuple:
    """A task's prompt cache ("key.{i}"/"value.{i}", as prompt_cache gives it) and head (one-task names) from its
    rows of a merged bundle's tables: the keys it sees, at the layers where it sees any."""
    cache = {}
    for i, seen in enumerate(rows["task.visible"]):
        p = int(seen.sum())
        if p:
            past = rows[f"task.past.{i}"]  # [2, kv_heads, Q', head_dim], right-aligned
            cache[f"key.{i}"], cache[f"value.{i}"] = past[0][:, past.shape[2] - p :], past[1][:, past.shape[2] - p :]
    head = {"classifier.weight": rows["task.classifier.weight"][:, :num_labels].T,
            "classifier.bias": rows["task.classifier.bias"][:num_labels]}
    return cache, head


class DecoderMultiTask(TaskTableNet, nn.Cell):
    """Several tasks' prompts and heads on one frozen causal LM, each row of a batch its own task: the decoder's
    builder.models.classifier.MultiTaskClassifier (same inputs, output and task tables).

    Each row gathers its prompt's keys and values at every layer (decoder_task_tables), its positions (its text
    starts after its own prompt) and its head by its task id; a row reads what its own bundle's graph reads.
    """

    family = "decoder"  # builder.families
    shape_of = staticmethod(decoder_table_shape)

    def __init__(self, decoder: Decoder, tasks: list, values: list):
        super().__init__()
        cfg = decoder.config
        self.decoder = decoder
        self.hold_tasks(tasks, decoder_task_tables(decoder, tasks, values), decoder_table_shape(cfg, tasks))
        self.layer_count = cfg.num_layers
        self.index = Tensor(np.arange(cfg.max_positions, dtype=np.int32))

    def forward(self, input_ids, attention_mask, token_type_ids, task_ids, tables):
        b, s = input_ids.shape
        x = self.decoder.embed(input_ids)
        positions = self.index[:s].expand_dims(0) + self.rows(tables, "task.text_start", task_ids).expand_dims(1)
        cos = ops.gather(self.decoder.cos, positions, 0).expand_dims(1)  # [b, 1, s, head_dim]: a row's own
        sin = ops.gather(self.decoder.sin, positions, 0).expand_dims(1)
        text_bias = self.decoder.mask_bias(attention_mask, 0)  # [b, 1, s, s]
        visible = self.rows(tables, "task.visible", task_ids)  # [b, layers, Q]
        pick = last_token_rows(attention_mask).expand_dims(2)
        q = self.past_len
        for i in range(self.layer_count):
            past = ()
            bias = text_bias
            if i >= self.past_from:
                cache = ops.gather(self.table(tables, f"task.past.{i}"), task_ids, 1)  # [2, b, kv, Q, d]
                past = (cache[0], cache[1])
                prompt_bias = (1.0 - visible[:, i].astype(ms.float32)) * MASK_FILL
                bias = ops.concat((ops.broadcast_to(prompt_bias.reshape(b, 1, 1, q), (b, 1, s, q)), text_bias), 3)
            if i < self.layer_count - 1:
                x = self.decoder.layers[i](x, bias, cos, sin, *past)
            else:
                x = self.decoder.layers[i].last_row(x, pick, bias, cos, sin, *past)
        features = self.decoder.norm(x[:, 0])
        weight = self.rows(tables, "task.classifier.weight", task_ids)  # [b, hidden, width]
        return (ops.matmul(features.expand_dims(1), weight).squeeze(1)
                + self.rows(tables, "task.classifier.bias", task_ids))
