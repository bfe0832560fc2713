"""Instruction data for prompt-tuning a causal LM (builder.training.instruct trains on it): the Alpaca-style JSONL,
the chat format (ChatML, shared with the generation bundle's template), tokenization as the runtime's generator
feeds the model, and the batches of answer positions the LM loss reads.

PEFT CAUSAL_LM semantics, as builder.models.decoder: `prompt-tuning` puts P vectors
in front of the token embeddings (positions 0..P-1, the text from P on);
`prefix-tuning` puts P keys and values in front of every layer's own (the
text's positions from P on).  The loss is the mean cross-entropy over the
answer's tokens only (the answer, then <|im_end|>): logits at position t
predict token t + 1, the prompt's and the question's positions are ignored
(label -100, as transformers writes it).  The LM head runs only at those
positions: SmolLM2's 49,152-word head at every position would cost more than
the 30 layers below it.

The soft prompt takes the place of the chat template's system message: it
sits at positions 0..P-1, where SmolLM2-Instruct's chat template puts
"<|im_start|>system\\n...<|im_end|>\\n", and the user's turn follows it.  It
starts as the tokens of a system message (DEFAULT_INIT_TEXT), so before
training it *is* that hard system prompt (for prompt-tuning, the tokens'
embeddings at the same positions; for a prefix, exactly their KV cache), and
training turns it into a learned system prompt.  The trained net's
`prompt_cache()` is what a generation bundle starts its KV cache with.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptbundle.runtime.data import jsonl_rows, read_text
from ptbundle.runtime.template import Template
from ptbundle.runtime.text import encode, load_tokenizer

from ..errors import DataError
from ..families.decoder import CHATML_END, CHATML_USER

# --- data ----------------------------------------------------------------------------------------------------------

FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class Example:
    """One instruction: what the user asks (instruction, and input when there is one) and the answer."""

    instruction: str
    input: str
    output: str
    where: str | None = None  # "file:line", for error messages


def read_instructions(path) -> list:
    """Alpaca-style JSONL: one {"instruction", "input", "output"} object a line ("input" may be "" or left out).

    Blank lines are skipped; anything else wrong is a DataError of one line naming the file, the line and the
    field."""
    path = Path(path)
    content = read_text(path)
    examples = []
    for n, row in jsonl_rows(content, path):  # the runtime's JSONL reader: the same errors as every data file
        where = f"{path}:{n}"
        values = {}
        for name in FIELDS:
            if name not in row:
                if name == "input":
                    values[name] = ""
                    continue
                raise DataError(f"{where}: no field {name!r} (fields: {', '.join(map(str, row)) or 'none'})")
            value = row[name]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} is {type(value).__name__}, not a string")
            values[name] = value.strip()
        for name in ("instruction", "output"):
            if not values[name]:
                raise DataError(f"{where}: empty field {name!r}")
        examples.append(Example(values["instruction"], values["input"], values["output"], where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


# --- the chat format: the one place training and the generation bundle take it from ----------------------------

@dataclass(frozen=True)
class ChatFormat:
    """How an instruction becomes the model's input, and where its answer ends.

    `template` is the generation bundle's template (runtime.template syntax, one {text} slot), applied in token
    space as the runtime's generator applies it (runtime.generate.Generator.encode: runtime.text.encode with
    the parsed Template); `prompt_ids` here calls the same function.  `end` closes the answer: the
    model learns to say it, and the runtime stops at it (SmolLM2's eos id 2)."""

    template: str
    end: str

    def user_text(self, example: Example) -> str:
        """What the user says: the instruction, then a newline and the input when there is one."""
        return f"{example.instruction}\n{example.input}" if example.input else example.instruction

    def target(self, example: Example) -> str:
        return example.output + self.end


# SmolLM2-Instruct's ChatML without its system message (the soft prompt is the system message).
CHAT_FORMAT = ChatFormat(CHATML_USER.format("{text}"), CHATML_END)
# What SmolLM2's chat template puts first when no system message is given (its GGUF's tokenizer.chat_template):
# the hard baseline a learned system prompt replaces.
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
# The soft prompt's starting tokens when the recipe gives none: a system message of SmolLM2's 17 tokens (a
# prompt of P < 17 starts from the first P, one of P > 17 repeats them, as PEFT does).
DEFAULT_INIT_TEXT = "<|im_start|>system\nYou are a helpful assistant. Answer in one short sentence.<|im_end|>\n"
IGNORE = -100  # the label of a position the loss skips (transformers' ignore_index)


def instruction_tokenizer(backbone):
    """The backbone's tokenizer, untruncated: the runtime's generator never truncates a prompt either (it refuses
    one longer than the context), and an example longer than --max-length is an error here."""
    tokenizer = load_tokenizer(backbone.tokenizer_path, backbone.config.max_positions)
    tokenizer.no_truncation()
    return tokenizer


@functools.lru_cache(maxsize=8)
def chat_template(source: str) -> Template:
    """The parsed template (a TemplateError of one line if it is not one)."""
    return Template.parse(source)


def prompt_ids(tokenizer, text: str, fmt: ChatFormat = CHAT_FORMAT) -> list:
    """The ids the runtime's generator feeds for the user's `text` (runtime.generate.Generator.encode):
    runtime.text.encode through the template, its literal pieces and the text tokenized apart and joined."""
    return encode(tokenizer, [text], None, chat_template(fmt.template))[0].ids


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: `ids` = prompt then target; `labels` = IGNORE on the prompt, the target's ids on
    the target (aligned with ids, unshifted: the loss reads labels[t + 1] at position t)."""

    ids: list
    labels: list
    where: str | None = None

    @property
    def prompt_length(self) -> int:
        return sum(1 for x in self.labels if x == IGNORE)

    def target_positions(self) -> list:
        """The positions whose logits predict a target token: the prompt's last one to the one before the end."""
        return [t for t in range(len(self.ids) - 1) if self.labels[t + 1] != IGNORE]


def encode_example(tokenizer, example: Example, fmt: ChatFormat = CHAT_FORMAT, max_length: int | None = None) -> Encoded:
    prompt = prompt_ids(tokenizer, fmt.user_text(example), fmt)
    target = tokenizer.encode(fmt.target(example), add_special_tokens=False).ids
    ids = prompt + target
    if max_length is not None and len(ids) > max_length:
        raise DataError(f"{example.where or 'example'}: {len(prompt)} prompt + {len(target)} answer tokens ="
                        f" {len(ids)}, more than --max-length {max_length}")
    return Encoded(ids, [IGNORE] * len(prompt) + target, example.where)


def encode_examples(tokenizer, examples, fmt: ChatFormat = CHAT_FORMAT, max_length: int | None = None) -> list:
    return [encode_example(tokenizer, e, fmt, max_length) for e in examples]


# Sequences padded to multiples of SEQ_MULTIPLE, answers to TARGET_MULTIPLE: few shapes, so few train graphs
# to compile (MindSpore's CPU backend holds GBs of buffers per compiled shape of a 30-layer decoder).
SEQ_MULTIPLE = 16
TARGET_MULTIPLE = 16


def batch_arrays(encoded, pad_id: int, seq_multiple: int = SEQ_MULTIPLE, target_multiple: int = TARGET_MULTIPLE):
    """A batch of Encoded, right-padded: (input_ids [b, S] int32, attention_mask [b, S] int32, target_index [b, T]
    int32 (text positions whose logits predict a target), target_ids [b, T] int32, target_weight [b, T] float32
    (1 for a target, 0 for padding))."""
    seq = -(-max(len(e.ids) for e in encoded) // seq_multiple) * seq_multiple
    width = -(-max(len(e.target_positions()) for e in encoded) // target_multiple) * target_multiple
    b = len(encoded)
    ids = np.full((b, seq), pad_id, np.int32)
    mask = np.zeros((b, seq), np.int32)
    index = np.zeros((b, width), np.int32)
    targets = np.zeros((b, width), np.int32)
    weight = np.zeros((b, width), np.float32)
    for row, e in enumerate(encoded):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1
        positions = e.target_positions()
        index[row, : len(positions)] = positions
        targets[row, : len(positions)] = [e.labels[t + 1] for t in positions]
        weight[row, : len(positions)] = 1.0
    return ids, mask, index, targets, weight


