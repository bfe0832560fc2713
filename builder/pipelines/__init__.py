"""Whole jobs over the layers below, one per pt-build command: export (soft + hard + comparison), instruct,
import of a PEFT adapter, merge."""
