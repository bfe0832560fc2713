"""The training recipe: every choice that decides the result, recorded in the manifest."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Recipe:
    """Everything that decides the result; recorded in the manifest."""

    virtual_tokens: int = 20
    init: str = "vocab"  # "vocab" (sampled frequent tokens), "text", or "random"
    init_text: str | None = None
    pooling: str = "mean"
    epochs: int = 1
    batch_size: int = 16  # dev 77.9 vs 77.4 at 32 (1 epoch): twice the updates for the same compute
    prompt_lr: float = 3e-2  # soft prompts need rates 10-100x a head's
    head_lr: float = 3e-3
    weight_decay: float = 0.01  # on the head only; decaying a prompt pulls it to 0
    warmup: float = 0.1  # fraction of all steps
    max_length: int = 128
    seed: int = 0
