"""Backbone families, a registry: `family_of(backbone or net)` gives the one object that knows what differs
between encoders and decoders (builder.families.base.Family)."""

from __future__ import annotations

from .base import Family
from .decoder import DECODER
from .encoder import ENCODER

FAMILIES: dict[str, Family] = {ENCODER.name: ENCODER, DECODER.name: DECODER}


def family_of(thing) -> Family:
    """The family of a Backbone (its architecture's `family`) or of a net (its class's `family`)."""
    return FAMILIES[thing.family]
