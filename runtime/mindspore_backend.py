"""model.mindir run by MindSpore's GraphCell: the backend for Ascend and GPU.

MindSpore is imported here and nowhere else in the runtime, so only bundles
loaded with backend="mindspore" pay its 3 s and 400 MB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class MindSporeModel:
    """Same call as OnnxModel: int32 [batch, seq] arrays in, float32 logits out."""

    # GraphCell prepares per input shape: multiples of 8 keep the shapes few
    # at a little extra padding.
    pad_multiple = 8

    def __init__(self, path: Path, device: str = "CPU"):
        import mindspore as ms

        ms.set_device(device)
        self.tensor = ms.Tensor
        self.cell = ms.nn.GraphCell(ms.load(str(path)))

    def __call__(self, ids, mask, types) -> np.ndarray:
        return self.cell(self.tensor(ids), self.tensor(mask), self.tensor(types)).asnumpy()
