"""Training checkpoints: everything `builder.training.loop.fit` needs to go on where a stopped run stopped.

One safetensors file: the trainable parameters, AdamW's two moments and
step count (which also indexes the learning-rate schedule), the best
epoch's weights so far, and the state of the batch order's RNG at the
start of the current epoch; the loop's counters, curve and timings ride in
its metadata.  Written to a temporary file and renamed over the old one, so
a kill at any moment leaves either the previous checkpoint or the new one.
Resuming redraws the epoch's batches from that RNG state and skips those
already done, so a resumed run computes exactly what the uninterrupted run
would (tests/builder/training/test_checkpoint.py: identical bundles after a SIGKILL).
A checkpoint records a fingerprint of its run (recipe, data, backbone);
another run's is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from mindspore import Tensor
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from ..errors import BuildError

FORMAT = "ptbundle-checkpoint-1"
# Fault injection for tests: "STEP" (or "STEP:RANK", one msrun worker) SIGKILLs the process right after that step.
KILL_AFTER_STEP = "PTBUNDLE_KILL_AFTER_STEP"


@dataclass(frozen=True)
class Checkpoints:
    path: Path
    every: int  # steps between checkpoints; 0: at the end of each epoch only
    resume: bool
    fingerprint: str  # of the run: recipe, training data, backbone


@dataclass
class LoopState:
    """builder.training.loop.fit between two steps."""

    epoch: int = 1  # the epoch being run, 1-based
    batch: int = 0  # batches of it already done
    steps: int = 0  # steps done in all
    loss_sum: float = 0.0
    seen: int = 0
    correct: int = 0
    curve: list = field(default_factory=list)
    best_epoch: int = 0
    best_dev: float | None = None  # the best epoch's Objective.score (None: no epoch yet)
    step_seconds: list = field(default_factory=list)
    seconds: float = 0.0  # training time before this process


def fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()


def save(checkpoints: Checkpoints, optimizer, state: LoopState, epoch_rng: tuple, best: dict | None) -> None:
    arrays = {f"param.{i}": p.asnumpy() for i, p in enumerate(optimizer.parameters)}
    arrays |= {f"adam_m.{i}": p.asnumpy() for i, p in enumerate(optimizer.moments1)}
    arrays |= {f"adam_v.{i}": p.asnumpy() for i, p in enumerate(optimizer.moments2)}
    arrays["global_step"] = optimizer.global_step.asnumpy()
    arrays["rng_keys"] = np.asarray(epoch_rng[1], np.int64)
    arrays |= {f"best/{k}": np.asarray(v) for k, v in (best or {}).items()}
    meta = {"format": FORMAT, "fingerprint": checkpoints.fingerprint, "state": json.dumps(asdict(state)),
            "rng": json.dumps([epoch_rng[0], int(epoch_rng[2]), int(epoch_rng[3]), float(epoch_rng[4])])}
    path = checkpoints.path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load(checkpoints: Checkpoints, optimizer) -> tuple:
    """(LoopState, epoch-start RNG state, best weights or None), with the optimizer's tensors restored."""
    path = checkpoints.path
    if not path.is_file():
        raise BuildError(f"--resume: no checkpoint at {path} (the run finished, or never reached one)")
    try:
        arrays = load_file(str(path))
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise BuildError(f"{path}: not a readable checkpoint ({e})") from e
    if meta.get("format") != FORMAT:
        raise BuildError(f"{path}: not a {FORMAT} file")
    if meta.get("fingerprint") != checkpoints.fingerprint:
        raise BuildError(f"{path}: written by another run (its recipe, data or backbone differ); remove it or run"
                         f" without --resume")
    for name, group in (("param", optimizer.parameters), ("adam_m", optimizer.moments1),
                        ("adam_v", optimizer.moments2)):
        for i, p in enumerate(group):
            p.set_data(Tensor(arrays[f"{name}.{i}"]))
    optimizer.global_step.set_data(Tensor(arrays["global_step"]))
    kind, pos, has_gauss, gauss = json.loads(meta["rng"])
    rng = (kind, arrays["rng_keys"].astype(np.uint32), pos, has_gauss, gauss)
    best = {k[len("best/"):]: v for k, v in arrays.items() if k.startswith("best/")} or None
    return LoopState(**json.loads(meta["state"])), rng, best


def maybe_die(steps: int, rank: int = 0) -> None:
    if os.environ.get(KILL_AFTER_STEP) in (str(steps), f"{steps}:{rank}"):
        os.kill(os.getpid(), signal.SIGKILL)
