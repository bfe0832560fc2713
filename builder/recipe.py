"""The training recipe: every choice that decides the result, recorded in the manifest.

`Recipe` is the one source of truth: its fields carry their defaults, help
text and limits; `recipe_options` turns them into pt-build's click options,
and `Recipe(...)` checks every value with a message naming the option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import click

from .errors import RecipeError
from .models.pooling import POOLING
from .models.prompts import PROMPTS, PromptSpec

INITS = ("vocab", "text", "random")


def prompt_methods() -> tuple:
    """--method's choices: the registered prompt methods (builder.models.prompts), less "none"."""
    return tuple(name for name in PROMPTS if name != "none")


def takers(capability: str) -> list:
    """The prompt methods that have `capability` (builder.models.prompts)."""
    return [name for name, kind in PROMPTS.items() if getattr(kind, capability)]


def poolings() -> tuple:
    return tuple(POOLING)


def knob(default, help: str, *, low=None, high=None, choices=None):
    """A recipe field with what its pt-build option shows and accepts (`choices`: a tuple, or a function giving
    one: a registry's names, read when asked, so a kind registered later is a choice too)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


def field_type(f) -> type:
    """int, float or str (annotations are strings here: `from __future__ import annotations`)."""
    return {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the result; recorded in the manifest.

    Chosen on MR dev over several seeds (docs/prompts.md, "The default recipe").
    """

    # prefix-tuning: MR dev 83.9 against prompt-tuning's 79.6 (docs/prompts.md, "The default recipe").
    method: str = knob("prefix-tuning", "Soft prompt method: virtual tokens before the text (prompt-tuning), learned"
                       " keys and values at every layer from --layer on (prefix-tuning, P-tuning v2), or virtual"
                       " tokens entering at --layer (late-prompt).", choices=prompt_methods)
    virtual_tokens: int = knob(20, "Virtual tokens of the soft prompt (0: none, the head alone).", low=0, high=256)
    layer: int = knob(0, "prefix-tuning: the first layer with a prefix; late-prompt: the layer the prompt enters"
                      " (the layers below run once per training text).", low=0, high=1000)
    prefix_projection: int = knob(0, "prefix-tuning: hidden size of PEFT's reparameterization MLP, folded into"
                                  " the prefix at export (0: none).", low=0, high=65536)
    init: str = knob("vocab", "Prompt init: sampled frequent training tokens (their embeddings; for a prefix"
                     " their keys and values at each layer), --init-text's tokens, or random.",
                     choices=INITS)
    init_text: str | None = knob(None, "Text whose token embeddings start the prompt (implies --init text).")
    pooling: str = knob("mean", "How the head reads the encoder: mean of the text tokens, or the first position"
                        " through the pooler.", choices=poolings)
    dropout: float = knob(0.0, "Dropout while training, at BERT's places in the frozen encoder and before the head"
                          " (an encoder's; none at inference).", low=0.0, high=0.9)
    label_smoothing: float = knob(0.0, "Label smoothing of the training loss: the gold label's target is 1 - x,"
                                  " the rest shared by all labels.", low=0.0, high=0.5)
    epochs: int = knob(3, "Passes over the training data; the best epoch on dev is kept.", low=1, high=1000)
    # 8: twice the updates of 16; with a prefix, MR dev 84.9 and 84.7 against 83.9 and 84.2 (seeds 0, 1).
    batch_size: int = knob(8, "Training batch size.", low=1, high=4096)
    prompt_lr: float = knob(1e-2, "Peak learning rate of the prompt (soft prompts need 10-100x a head's).",
                            low=0.0)
    head_lr: float = knob(1e-3, "Peak learning rate of the head.", low=0.0)
    weight_decay: float = knob(0.01, "AdamW weight decay, on the head only (decaying a prompt pulls it to 0).",
                               low=0.0, high=1.0)
    warmup: float = knob(0.1, "Fraction of the steps spent warming up the learning rates.", low=0.0, high=1.0)
    max_length: int = knob(128, "Text tokens per input (special tokens included), before the prompt.",
                           low=8, high=8192)
    seed: int = knob(0, "Seed of the prompt init, head init and batch order.", low=0, high=2**31 - 1)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            flag = option_flag(f.name)
            if value is None and f.default is None:
                continue
            kind = field_type(f)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise RecipeError(f"{flag}: expected {kind.__name__}, got {value!r}")
            choices = choices_of(f)
            if choices and value not in choices:
                raise RecipeError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
            if meta["low"] is not None and value < meta["low"] or meta["high"] is not None and value > meta["high"]:
                raise RecipeError(f"{flag} {value!r}: must be between {meta['low']} and {meta['high']}"
                                  if meta["high"] is not None else f"{flag} {value!r}: must be at least {meta['low']}")
        if self.init == "text" and not (self.init_text or "").strip():
            raise RecipeError("--init text needs --init-text TEXT (the words whose embeddings start the prompt)")
        if self.method == "late-prompt" and self.layer == 0:
            raise RecipeError("--method late-prompt enters at --layer 1 or above (at layer 0 it is prompt-tuning)")
        kind = PROMPTS[self.method]
        if self.prefix_projection and not kind.takes_projection:
            raise RecipeError(f"--prefix-projection is for --method {' or '.join(takers('takes_projection'))},"
                              f" not {self.method}")
        if self.layer and not kind.takes_layer:
            raise RecipeError(f"--layer is for {' and '.join(takers('takes_layer'))}; {self.method} enters at the"
                              f" embeddings")
        if self.init_text is not None and self.init != "text":
            raise RecipeError(f"--init-text starts the prompt from text, --init {self.init} from elsewhere:"
                              f" give one of them")

    @classmethod
    def from_options(cls, **values) -> "Recipe":
        """From pt-build's options: --init-text alone implies --init text."""
        if values.get("init_text") is not None and values.get("init") is None:
            values["init"] = "text"
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def prompt_spec(self) -> PromptSpec:
        """The builder.models.prompts.PromptSpec this recipe trains."""
        return PromptSpec.of(self.method, self.virtual_tokens, self.layer, self.prefix_projection)


def check_positions(max_length: int, spec: PromptSpec, backbone, error: type) -> None:
    """--max-length text tokens and the prompt's positions (builder.models.prompts: prompt tuning's tokens take
    some, a prefix shifts the text's) must have position embeddings in the backbone."""
    cfg = backbone.config
    room, needed = cfg.max_positions - cfg.position_offset, max_length + spec.positions()
    if needed > room:
        raise error(f"--max-length {max_length}" + (f" + {spec.virtual_tokens} virtual tokens" if needed > max_length
                    else "") + f" = {needed} positions; {backbone.name} has {room}")


def choices_of(f) -> tuple:
    choices = f.metadata["choices"]
    return tuple(choices()) if callable(choices) else tuple(choices or ())


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def recipe_options(command):
    """Decorate a click command with one option per Recipe field (defaults, help and limits from the field)."""
    defaults = Recipe()
    for f in reversed(dataclasses.fields(Recipe)):
        meta = f.metadata
        ranges = {int: click.IntRange, float: click.FloatRange}
        if choices_of(f):
            kind = click.Choice(choices_of(f))
        elif field_type(f) in ranges:
            kind = ranges[field_type(f)](meta["low"], meta["high"])
        else:
            kind = str
        default = getattr(defaults, f.name)
        # Options left out stay None, so from_options can tell "not given" from the default.
        command = click.option(option_flag(f.name), f.name, type=kind, default=None,
                               help=meta["help"] + (f"  [default: {default}]" if default is not None else ""))(command)
    return command


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))
