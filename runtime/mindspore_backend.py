"""model.mindir run by MindSpore's GraphCell: the backend for Ascend and GPU.

MindSpore is imported here (and in mindspore_generate, its decoder session
for generation bundles) and nowhere else in the runtime, so only bundles
loaded with backend="mindspore" pay its 3 s and 400 MB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BundleError, DeviceError
from .format import table_names


def import_mindspore():
    """The mindspore module; without it (the runtime-only install) the backend says which extra it needs."""
    try:  # the mindspore extra (3 s, 400 MB): never on the onnxruntime path
        import mindspore
    except ImportError as e:
        raise BundleError(f"the mindspore backend needs MindSpore ({e}): pip install 'ptbundle[mindspore]', or use"
                          f" backend='onnxruntime' on CPU") from e
    return mindspore


def select_device(device: str) -> None:
    """Run MindSpore on `device`, unless this process already chose one.

    MindSpore's device is process-wide and cannot change once set, so a
    backend never changes it: it makes the first choice if nobody has, and
    refuses a bundle for another device.
    """
    ms = import_mindspore()

    try:
        from mindspore._c_expression import DeviceManagerConf

        chosen = DeviceManagerConf.get_instance().is_device_enable()
    except (ImportError, AttributeError):  # another MindSpore version: ask set_device
        chosen = False
    if not chosen:
        try:
            ms.set_device(device)
        except (RuntimeError, ValueError) as e:  # e.g. GPU asked for where MindSpore has no CUDA
            raise DeviceError(f"MindSpore cannot run on {device} here ({first_sentence(e)})") from e
        return
    current = ms.get_current_device().device_target
    if current != device:
        raise DeviceError(f"MindSpore in this process runs on {current}; {device} needs a process of its own"
                          f" (MindSpore's device cannot change once set)")


def first_sentence(error: Exception) -> str:
    """MindSpore's messages run to pages (C++ call stacks included): their first sentence names the problem."""
    return str(error).strip().splitlines()[0].split(". ")[0][:200]


def load_graph(path: Path, device: str):
    """A MindIR file as a GraphCell on `device` (select_device); an unreadable file is a one-line BundleError."""
    ms = import_mindspore()

    select_device(device)
    try:
        return ms.nn.GraphCell(ms.load(str(path)))
    except Exception as e:  # MindSpore raises RuntimeError/ValueError for unreadable graphs
        raise BundleError(f"{path}: MindSpore cannot load it ({first_sentence(e)})") from e


class MindSporeModel:
    """Same call as OnnxModel: int32 [batch, seq] arrays in, float32 logits out."""

    platform = "mindspore_mindir"  # what V2 model metadata calls it

    # GraphCell prepares per input shape: multiples of 8 keep the shapes few
    # at a little extra padding.
    pad_multiple = 8
    variant = None
    # Not timed by runtime.tuning: every new shape compiles, and on GPU or Ascend a CPU's timing says nothing.
    tuned = False
    token_budget = None
    call_tokens = None  # what one more call costs in padded tokens (runtime.tuning.calls); None: not cut

    def __init__(self, path: Path, device: str = "CPU", tables: dict | None = None, variant: str | None = None,
                 precision: str | None = None):
        ms = import_mindspore()

        self.cell = load_graph(path, device)
        self.tensor = ms.Tensor
        # A merged bundle's task tables (runtime.format): positional inputs after task_ids, made Tensors once.
        self.tables = tuple(ms.Tensor(np.ascontiguousarray(tables[n])) for n in table_names(tables or {}))
        self.path = path  # its logits' width is known once run (runtime.bundle.batched_logits checks it then)

    def swap_tables(self, tables: dict) -> None:
        """As OnnxModel.swap_tables (Tensor.from_numpy shares the arrays' memory)."""
        self.tables = tuple(self.tensor.from_numpy(np.ascontiguousarray(tables[n])) for n in table_names(tables))

    def __call__(self, ids, mask, types, task_ids=None) -> np.ndarray:
        """`task_ids` [batch]: a multi-task graph's row tasks (format.TASK_INPUT)."""
        arrays = (ids, mask, types) if task_ids is None else (ids, mask, types, task_ids)
        return self.cell(*(self.tensor(np.ascontiguousarray(a, np.int32)) for a in arrays), *self.tables).asnumpy()
