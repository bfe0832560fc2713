"""model.mindir run by MindSpore's GraphCell: the backend for Ascend and GPU.

MindSpore is imported here and nowhere else in the runtime, so only bundles
loaded with backend="mindspore" pay its 3 s and 400 MB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BundleError


def select_device(device: str) -> None:
    """Run MindSpore on `device`, unless this process already chose one.

    MindSpore's device is process-wide and cannot change once set, so a
    backend never changes it: it makes the first choice if nobody has, and
    refuses a bundle for another device.
    """
    import mindspore as ms

    try:
        from mindspore._c_expression import DeviceManagerConf

        chosen = DeviceManagerConf.get_instance().is_device_enable()
    except (ImportError, AttributeError):  # another MindSpore version: ask set_device
        chosen = False
    if not chosen:
        ms.set_device(device)
        return
    current = ms.get_current_device().device_target
    if current != device:
        raise BundleError(f"MindSpore in this process runs on {current}; a bundle on {device} needs a process"
                          f" of its own (MindSpore's device cannot change once set)")


class MindSporeModel:
    """Same call as OnnxModel: int32 [batch, seq] arrays in, float32 logits out."""

    # GraphCell prepares per input shape: multiples of 8 keep the shapes few
    # at a little extra padding.
    pad_multiple = 8

    def __init__(self, path: Path, device: str = "CPU"):
        import mindspore as ms

        select_device(device)
        self.tensor = ms.Tensor
        try:
            self.cell = ms.nn.GraphCell(ms.load(str(path)))
        except Exception as e:  # MindSpore raises RuntimeError/ValueError for unreadable graphs
            raise BundleError(f"{path}: MindSpore cannot load it ({str(e).splitlines()[0][:200]})") from e

    def __call__(self, ids, mask, types) -> np.ndarray:
        return self.cell(self.tensor(ids), self.tensor(mask), self.tensor(types)).asnumpy()
