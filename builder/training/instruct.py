"""Training a decoder's soft prompt with the LM loss on instruction answers (`pt-build instruct`)."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ptbundle.runtime.text import batch_indices

from ..errors import DataError, RecipeError
from ..families import family_of
from ..models.decoder import DecoderClassifier
from ..models.device import eager
from ..models.prompts import PromptSpec
from .chat import (CHAT_FORMAT, DEFAULT_INIT_TEXT, DEFAULT_SYSTEM, ChatFormat, batch_arrays,
                                            encode_examples, instruction_tokenizer, prompt_ids)
from .init import initial_prompt
from .loop import Objective, fit, lr_schedule



class LMPromptModel(nn.Cell):
    """A DecoderClassifier's prompt on its frozen Decoder, read as a language model at chosen positions.

    inputs:  input_ids, attention_mask (int32 [b, S], right-padded), target_index (int32 [b, T]: text positions
             whose logits predict a target), target_ids (int32 [b, T]), target_weight (float32 [b, T], 0: padding)
    output:  (mean cross-entropy over the weighted targets, per-target losses [b, T], argmax ids [b, T])

    The prompt's Parameters, prompt_params(), head_state() and prompt_cache() are the DecoderClassifier's (`net`);
    its one-label head is frozen and unused.  The pass over the layers is upper_features' without the pooling:
    prompt at the embeddings or keys and values in front of each layer from `split` on, text positions from
    net.start().
    """

    def __init__(self, net: DecoderClassifier):
        super().__init__(auto_prefix=False)  # the prompt's Parameters keep their names (prompt_embeddings)
        self.net = net
        self.decoder = net.decoder
        self.offset = net.prompt.layout(net.spec)[0]  # states in front of the text at the embeddings (P or 0)
        self.has_keys_values = net.prompt.has_keys_values
        self.p = net.num_virtual_tokens if self.has_keys_values else 0
        for param in net.classifier.get_parameters():
            param.requires_grad = False

    def hidden_states(self, input_ids, attention_mask):
        """The last layer's states [b, offset + S, hidden] (before the final norm), prompt positions included."""
        net, decoder = self.net, self.decoder
        embeds, mask, _ = net.prompt(decoder.embed(input_ids), attention_mask, attention_mask)
        x = embeds
        cos, sin = decoder.positions(net.start(), x.shape[1])
        bias = decoder.mask_bias(mask, self.p)
        plain = decoder.mask_bias(mask, 0) if net.split > 0 else bias  # below a prefix's first layer
        table = net.prompt.table()
        b = x.shape[0]
        for i in range(net.layer_count):
            if self.has_keys_values and i >= net.split:
                keys, values = net.prompt.keys_values(table, i, b)  # keys [b, kv, d, P]
                x = decoder.layers[i](x, bias, cos, sin, keys.transpose(0, 1, 3, 2), values)
            else:
                x = decoder.layers[i](x, plain, cos, sin)
        return x

    def target_logits(self, input_ids, attention_mask, target_index):
        """[b, T, vocab]: the LM head at the text positions `target_index` only."""
        x = self.hidden_states(input_ids, attention_mask)
        b, n, h = x.shape
        t = target_index.shape[1]
        rows = ops.arange(0, b * n, n, dtype=ms.int32).expand_dims(1) + self.offset + target_index  # [b, T]
        picked = ops.gather(x.reshape(b * n, h), rows.reshape(-1), 0)
        return self.decoder.logits(self.decoder.norm(picked)).reshape(b, t, -1)

    def construct(self, input_ids, attention_mask, target_index, target_ids, target_weight):
        logits = self.target_logits(input_ids, attention_mask, target_index)
        gold = ops.gather_elements(logits, 2, target_ids.expand_dims(2)).squeeze(2)
        losses = ops.logsumexp(logits, 2, False) - gold  # [b, T]
        loss = (losses * target_weight).sum() / ops.maximum(target_weight.sum(), 1.0)
        return loss, losses * target_weight, logits.argmax(2).astype(ms.int32)

    def full_logits(self, input_ids, attention_mask):
        """[b, S, vocab] at every text position (the prompt's own positions left out): the reference a generation
        bundle's decoder graph is checked against."""
        x = self.hidden_states(input_ids, attention_mask)
        return self.decoder.logits(self.decoder.norm(x[:, self.offset :]))

    # the DecoderClassifier's prompt, for the bundle writer
    def prompt_params(self) -> dict:
        return self.net.prompt_params()

    def prompt_state(self) -> dict:
        """The prompt's arrays by name (numpy), as the bundle's prompt.safetensors / PEFT's adapter name them."""
        return {k: v.asnumpy().copy() for k, v in self.net.prompt_params().items()}

    def load_prompt_state(self, values: dict) -> None:
        self.net.load_head_state(values)

    def prompt_cache(self) -> dict:
        return self.net.prompt_cache()


class TargetLogits(nn.Cell):
    """LMPromptModel.target_logits as a Cell of its own (one compiled graph per shape)."""

    def __init__(self, model: LMPromptModel):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, attention_mask, target_index):
        return self.model.target_logits(input_ids, attention_mask, target_index)


class FullLogits(nn.Cell):
    def __init__(self, model: LMPromptModel):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, attention_mask):
        return self.model.full_logits(input_ids, attention_mask)


def build_model(backbone, spec: PromptSpec, prompt_init: dict | None = None, decoder=None) -> LMPromptModel:
    """LMPromptModel on the frozen decoder (a new one, or `decoder` shared with another model), prompt from
    `prompt_init` (name -> array) or zeros."""
    net = DecoderClassifier(decoder if decoder is not None else family_of(backbone).model(backbone), 1, spec)
    if prompt_init:
        net.load_head_state(prompt_init)
    return LMPromptModel(net)


def reference(model: LMPromptModel):
    """A generation bundle's `reference(input_ids, attention_mask)`: int arrays [b, S] -> logits [b, S, vocab]
    (eager: a parity check's few shapes compile no graphs)."""
    cell = FullLogits(model)
    cell.set_train(False)

    def run(ids, mask):
        with eager():
            return cell(Tensor(np.asarray(ids, np.int32)), Tensor(np.asarray(mask, np.int32))).asnumpy()

    return run


# --- training ------------------------------------------------------------------------------------------------------

class LMTrainStep(nn.Cell):
    """One compiled step: the LM loss on the targets, gradients of the prompt only, AdamW (no decay on a prompt)."""

    def __init__(self, model: LMPromptModel, recipe, steps: int):
        super().__init__(auto_prefix=False)
        self.model = model
        params = list(model.prompt_params().values())
        self.optimizer = nn.AdamWeightDecay(params, learning_rate=lr_schedule(recipe.prompt_lr, steps, recipe.warmup),
                                            weight_decay=0.0)
        self.grad_fn = ms.value_and_grad(self.model, None, self.optimizer.parameters, has_aux=True)

    def construct(self, input_ids, attention_mask, target_index, target_ids, target_weight):
        (loss, losses, predicted), grads = self.grad_fn(input_ids, attention_mask, target_index, target_ids,
                                                        target_weight)
        self.optimizer(grads)
        return loss, losses, predicted


def lm_metrics(model: LMPromptModel, encoded, pad_id: int, batch_size: int = 8) -> dict:
    """Token-weighted mean loss, perplexity and next-token accuracy over the targets of `encoded` (eager)."""
    model.set_train(False)
    total, tokens, correct = 0.0, 0, 0
    with eager():
        for index in batch_indices([len(e.ids) for e in encoded], batch_size):
            ids, mask, where, targets, weight = batch_arrays([encoded[i] for i in index], pad_id)
            _, losses, predicted = model(*(Tensor(a) for a in (ids, mask, where, targets, weight)))
            total += float(losses.asnumpy().sum())
            tokens += int(weight.sum())
            correct += int(((predicted.asnumpy() == targets) & (weight > 0)).sum())
    loss = total / max(tokens, 1)
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 4),
            "token_accuracy": round(correct / max(tokens, 1), 5), "tokens": tokens}


def start_recipe(recipe):
    """The recipe as trained here: the prompt starts from `init_text`, or DEFAULT_INIT_TEXT (unless --init
    random); a prompt is needed, of a method a decoder takes."""
    if recipe.virtual_tokens < 1:
        raise RecipeError("--virtual-tokens 0: instruction tuning trains a soft prompt; give it at least 1 token")
    if recipe.method not in ("prompt-tuning", "prefix-tuning"):
        raise RecipeError(f"--method {recipe.method}: a decoder takes prompt-tuning, prefix-tuning")
    if recipe.init == "random":
        return recipe
    return replace(recipe, init="text", init_text=recipe.init_text or DEFAULT_INIT_TEXT)


def train_prompt(backbone, examples_train, examples_dev, recipe, log=print, fmt: ChatFormat = CHAT_FORMAT):
    """Train a soft prompt with the LM loss on the answers; return (LMPromptModel with the best dev epoch's prompt,
    curve, metrics).

    AdamW on the prompt only (recipe.prompt_lr, linear warmup then decay), length-bucketed batches of
    recipe.batch_size, dev loss and token accuracy after each epoch, the epoch of lowest dev loss kept.
    `metrics["before"]` has the dev figures of the text alone (no system message), of SmolLM2's default
    system message as text, and of the initial prompt; `metrics["dev"]` those of the kept prompt."""

    recipe = start_recipe(recipe)
    ms.set_seed(recipe.seed)
    tokenizer = instruction_tokenizer(backbone)
    pad_id = backbone.config.pad_token_id
    train = encode_examples(tokenizer, examples_train, fmt, recipe.max_length)
    dev = encode_examples(tokenizer, examples_dev, fmt, recipe.max_length)
    if len(train) < recipe.batch_size:
        raise DataError(f"{len(train)} training examples, fewer than one batch of {recipe.batch_size}"
                        f" (lower --batch-size)")
    spec = recipe.prompt_spec()
    init = initial_prompt(backbone, recipe, tokenizer, [])
    model = build_model(backbone, spec, init)
    decoder = model.decoder

    started = time.time()
    before = {}
    plain = build_model(backbone, PromptSpec(), decoder=decoder)
    before["no_prompt"] = lm_metrics(plain, dev, pad_id)
    system = ChatFormat(DEFAULT_SYSTEM + fmt.template, fmt.end)
    before["default_system"] = lm_metrics(plain, encode_examples(tokenizer, examples_dev, system), pad_id)
    before["initial_prompt"] = lm_metrics(model, dev, pad_id)
    del plain
    log(f"dev before training: loss {before['no_prompt']['loss']:.4f} with no system message,"
        f" {before['default_system']['loss']:.4f} with SmolLM2's default one,"
        f" {before['initial_prompt']['loss']:.4f} with the initial prompt ({time.time() - started:.0f} s)")

    step = LMTrainStep(model, recipe, len(train) // recipe.batch_size * recipe.epochs)
    result = fit(step, language_modelling(step, model, train, dev, pad_id), [len(e.ids) for e in train], recipe,
                 model.prompt_state, log)
    del step
    model.load_prompt_state(result.weights)
    model.set_train(False)
    metrics = {"best_epoch": result.best_epoch, "dev": result.curve[result.best_epoch - 1]["dev"], "before": before,
               "train_seconds": round(time.time() - started, 1),
               "seconds_per_step_median": round(float(np.median(result.step_seconds)), 3),
               "steps": len(result.step_seconds), "chat_template": fmt.template, "init_text": recipe.init_text}
    return model, result.curve, metrics


def language_modelling(step: LMTrainStep, model: LMPromptModel, train: list, dev: list, pad_id: int) -> Objective:
    """The LM loss on the answers' tokens; the lowest dev loss picks the epoch."""
    def run(index):
        arrays = batch_arrays([train[i] for i in index], pad_id)
        _, losses, predicted = step(*(Tensor(a) for a in arrays))
        targets, weight = arrays[3], arrays[4]
        return (float(losses.asnumpy().sum()), int(weight.sum()),
                int(((predicted.asnumpy() == targets) & (weight > 0)).sum()))

    return Objective(run, lambda: lm_metrics(model, dev, pad_id), lambda d: -d["loss"],
                     lambda d: f"dev loss {d['loss']:.4f} (perplexity {d['perplexity']:.3f}, token accuracy"
                               f" {d['token_accuracy']:.4f})", accuracy="train_token_accuracy")


# --- a check, not the product: greedy decoding with a full pass per token (runtime.generate is the real one) ------

def greedy(model: LMPromptModel, tokenizer, text: str, max_new_tokens: int = 32, fmt: ChatFormat = CHAT_FORMAT,
           eos_ids=(2,), cell: TargetLogits | None = None) -> str:
    """The model's greedy answer to the user's `text`, as text."""
    return tokenizer.decode(greedy_ids(model, tokenizer, text, max_new_tokens, fmt, eos_ids, cell),
                            skip_special_tokens=True)


def greedy_ids(model: LMPromptModel, tokenizer, text: str, max_new_tokens: int = 32, fmt: ChatFormat = CHAT_FORMAT,
               eos_ids=(2,), cell: TargetLogits | None = None) -> list:
    """The model's greedy answer to the user's `text`, token ids up to an eos id (eager, no KV cache: one pass
    over the whole sequence per token)."""
    cell = cell or TargetLogits(model)
    cell.set_train(False)
    ids = prompt_ids(tokenizer, text, fmt)
    out = []
    with eager():
        for _ in range(max_new_tokens):
            n = len(ids)
            logits = cell(Tensor(np.array([ids], np.int32)), Tensor(np.ones((1, n), np.int32)),
                          Tensor(np.array([[n - 1]], np.int32))).asnumpy()[0, 0]
            token = int(logits.argmax())
            if token in eos_ids:
                break
            out.append(token)
            ids.append(token)
    return out
