"""Where and how MindSpore runs (graph mode on the chosen device; PyNative for one-off forward passes), and a
backbone's weights put into a Cell."""

from __future__ import annotations

import contextlib

import numpy as np
import mindspore as ms

from ptbundle.runtime.format import DEVICES
from ptbundle.runtime.mindspore_backend import select_device

from ..errors import RecipeError


def use_device(device: str = "CPU") -> None:
    """Graph mode on the given device; everything in the builder assumes it."""
    if device not in DEVICES:
        raise RecipeError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    ms.set_context(mode=ms.GRAPH_MODE)
    select_device(device)


@contextlib.contextmanager
def eager():
    """PyNative inside, the mode as it was after: for forward passes that should compile no graph: a graph
    per shape used once costs more than it saves (and a 30-layer decoder's keep GBs of buffers each)."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=mode)



def frozen(cell, values: dict):
    """`cell` with `values` (numpy, by parameter name; all must exist) assigned and every parameter frozen."""
    params = dict(cell.parameters_and_names())
    for name, value in values.items():
        if name not in params:
            raise KeyError(f"no parameter {name} in {type(cell).__name__}")
        params[name].set_data(ms.Tensor(np.ascontiguousarray(value, dtype=np.float32)))
    for p in cell.get_parameters():
        p.requires_grad = False
    return cell
