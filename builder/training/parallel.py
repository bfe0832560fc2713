"""Data parallelism under MindSpore's own launcher, msrun.

    msrun --worker_num 2 --local_worker_num 2 --master_port 8118 --log_dir logs --join True \
        "$(which pt-build)" export --prompt soft ...

msrun starts the workers with MS_ROLE=MS_WORKER and MS_WORKER_NUM set; a
pt-build it starts joins the group (`mindspore.communication.init`) and
trains data-parallel: every worker draws the same global batches of
workers x --batch-size examples (the same seed), trains on its own slice
of each, and the gradients are averaged across workers before each
optimizer step (`nn.DistributedGradReducer`, the all-reduce of MindSpore's
DATA_PARALLEL mode).  That is one process's step with the global batch, up
to the order of floating-point sums: the average over workers of per-worker
means instead of one mean.  Every worker scores dev (the weights are the
same everywhere, so they pick the same epoch); rank 0 alone logs, saves
checkpoints and writes the bundles.  The same code runs on CPU processes of
one machine, on a machine's GPUs or Ascend devices, and across machines
(msrun --node_rank, --master_addr: docs/training.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mindspore as ms
from mindspore.communication import get_group_size, get_rank, init


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def shard(self, index):
        """This worker's slice of a global batch (equal slices: the global batch is size x per-worker batch)."""
        per = len(index) // self.size
        return index[self.rank * per : (self.rank + 1) * per]


_WORLD = None


def world() -> World:
    """The process group msrun started this process in (joined on first call), or a world of one."""
    global _WORLD
    if _WORLD is None:
        # msrun starts this program as the scheduler too (MS_ROLE=MS_SCHED): its init() serves the
        # group and ends the process when the workers are done.
        if os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED"):
            init()
            ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
            _WORLD = World(get_rank(), get_group_size())
        else:
            _WORLD = World()
    return _WORLD
