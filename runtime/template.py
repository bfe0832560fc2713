"""Hard-prompt templates, applied in token space.

A template is text with a `{text}` slot, and a `{text_b}` slot for sentence
pairs: "Review: {text} It was".  Each literal piece and each input text is
tokenized on its own and the pieces are joined as token ids, so that

- an input can never merge with the template into other tokens, and
- truncation shortens the inputs, never the template (for "... It was" the
  words after the text are the ones that matter).

The whitespace before a slot moves into the slot, as written ("Review: {text}"
encodes " " + text, a chat template's "user\n{text}" "\n" + text), so
byte-level BPE (RoBERTa, Llama) sees the same tokens as it would in the
formatted string; WordPiece ignores it.  For pairs, segment A is
everything before `{text_b}` and segment B is `{text_b}` and what follows,
with the tokenizer's own special tokens ([CLS] a [SEP] b [SEP], or RoBERTa's).
Literal braces are written `{{` and `}}`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from tokenizers import Encoding

from .errors import TemplateError

SLOTS = ("text", "text_b")


@dataclass(frozen=True)
class Template:
    source: str
    pieces: tuple  # ("literal", str) | ("slot", name, leading whitespace)

    @classmethod
    def parse(cls, source: str, pair: bool = False) -> "Template":
        pieces = []
        try:
            parsed = list(string.Formatter().parse(source))
        except ValueError as e:  # e.g. "Single '}' encountered in format string"
            raise TemplateError(f"template {source!r}: {e} (write literal braces as {{{{ and }}}})") from e
        for literal, name, spec, conversion in parsed:
            if literal:
                pieces.append(("literal", literal))
            if name is None:
                continue
            if name not in SLOTS:
                shown = "{" + name + "}"
                raise TemplateError(f"template {source!r}: unknown slot {shown} (slots: {{text}}, {{text_b}})")
            if spec or conversion:
                raise TemplateError(f"template {source!r}: slot {{{name}}} takes no format spec or conversion")
            if any(p[0] == "slot" and p[1] == name for p in pieces):
                raise TemplateError(f"template {source!r}: slot {{{name}}} appears twice")
            space = ""
            if pieces and pieces[-1][0] == "literal":
                stripped = pieces[-1][1].rstrip()
                space = pieces[-1][1][len(stripped):]
                pieces[-1] = ("literal", stripped)
                if not stripped:
                    pieces.pop()
            pieces.append(("slot", name, space))
        slots = [p[1] for p in pieces if p[0] == "slot"]
        if "text" not in slots:
            raise TemplateError(f"template {source!r} has no {{text}} slot")
        if pair and "text_b" not in slots:
            raise TemplateError(f"template {source!r}: a sentence-pair task needs a {{text_b}} slot")
        if not pair and "text_b" in slots:
            raise TemplateError(f"template {source!r}: {{text_b}} is for sentence pairs, this task has one text")
        if slots[0] != "text":
            raise TemplateError(f"template {source!r}: {{text}} must come before {{text_b}}")
        return cls(source, tuple(pieces))

    @property
    def pair(self) -> bool:
        return any(p[0] == "slot" and p[1] == "text_b" for p in self.pieces)

    def format(self, text: str, text_b: str | None = None) -> str:
        """The template filled in as plain text (for people to read)."""
        values = {"text": text, "text_b": text_b}
        return "".join(p[1] if p[0] == "literal" else p[2] + values[p[1]] for p in self.pieces)

    def encode(self, tokenizer, texts, texts_b=None) -> list:
        """One Encoding per input, special tokens added, inputs truncated to fit."""
        texts = list(texts)
        if self.pair != (texts_b is not None):
            raise TemplateError(f"template {self.source!r} takes {'two texts' if self.pair else 'one text'} per input")
        max_length = (tokenizer.truncation or {}).get("max_length")
        literals = {p: tokenizer.encode(p[1], add_special_tokens=False) for p in self.pieces if p[0] == "literal"}
        budget = None
        if max_length is not None:
            fixed = tokenizer.num_special_tokens_to_add(self.pair) + sum(len(e.ids) for e in literals.values())
            budget = max_length - fixed
            if budget < (2 if self.pair else 1):
                raise TemplateError(f"template {self.source!r} takes {fixed} of the {max_length} tokens of an input:"
                                    f" no room for the text (raise --max-length)")
        slot_space = {p[1]: p[2] for p in self.pieces if p[0] == "slot"}
        a = tokenizer.encode_batch([slot_space["text"] + t for t in texts], add_special_tokens=False)
        b = tokenizer.encode_batch([slot_space["text_b"] + t for t in texts_b], add_special_tokens=False) \
            if self.pair else [None] * len(texts)
        # segment B starts at the {text_b} slot
        split = next((i for i, p in enumerate(self.pieces) if p[:2] == ("slot", "text_b")), len(self.pieces))
        out = []
        for ea, eb in zip(a, b):
            if budget is not None:
                fit(ea, eb, budget)
            slot = {"text": ea, "text_b": eb}
            joined = [literals[p] if p[0] == "literal" else slot[p[1]] for p in self.pieces]
            first = Encoding.merge(joined[:split], growing_offsets=True)
            second = Encoding.merge(joined[split:], growing_offsets=True) if self.pair else None
            out.append(tokenizer.post_process(first, second, add_special_tokens=True))
        return out


def fit(a: Encoding, b: Encoding | None, budget: int) -> None:
    """Truncate the input texts in place to `budget` tokens, longest first (as tokenizers does)."""
    na, nb = len(a.ids), len(b.ids) if b is not None else 0
    while na + nb > budget:
        if na >= nb:
            na -= 1
        else:
            nb -= 1
    if na < len(a.ids):
        a.truncate(na)
    if b is not None and nb < len(b.ids):
        b.truncate(nb)
