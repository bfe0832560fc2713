"""Choices that depend on the CPU, made by measuring on the CPU at hand and recorded, never by a constant.

What is fastest differs between machines that all run the same bundle:
on an AMD EPYC with AVX-512 onnxruntime's fused SkipLayerNormalization and
BiasGelu kernels cost the int8 graph a quarter of its speed, while on an
Intel Sapphire Rapids they gain fp32 3%; how many tokens one graph call
should take (a caller's batch of 64 ran 10-14% faster as calls of 512 on
that EPYC) depends on the CPU's caches and kernels too
(bench/perf/tuning.py prints every choice on the machine it runs on).  So the
first time a graph of a backbone is opened on a CPU, `tune` times a probe
batch through each variant the backend offers (`variants`) and through
chunks of each token budget (`BUDGETS`), keeps the fastest, and records it
with what it measured in a small JSON file (`cache_file`), keyed by the CPU
(model and instruction-set flags), the backend's version, the thread count,
the backbone and the graph.  Later opens on that CPU read the choice back
(a dictionary lookup); another CPU measures its own.

A token budget splits a batch into graph calls of at most that many padded
tokens (at least one row each): each row's result does not depend on its
batch (runtime.bundle.batched_logits), so the split changes speed only.
Within that bound a batch's rows, by length, are cut where padding would
cost more than another call (`calls`): the cost of a call is measured too,
as the padded tokens the probe runs in the time of a call of one short row
(`call_tokens`).  Batches of 16 random MR sentences, padded to their
longest, ran at 309 sentences/s fp32 and 1042 int8; cut this way, 404-411
and 1226 (AMD EPYC, 2 vCPUs, an ad hoc A/B: docs/measured.md, "A task
store of 100 tasks on one graph", which `bench/perf/serve_load.py
--store-tasks 100` measures through the server that gathers such batches).

PTBUNDLE_TUNING=off opens every graph with the backend's first variant (for
onnxruntime, the graph's ops as written) and whole batches, measuring
nothing (PTBUNDLE_CACHE_DIR moves the record).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BUDGETS = (None, 2048, 1024, 512)  # padded tokens per graph call; None: the caller's whole batch
PROBE_ROWS, PROBE_SEQ = 64, 32  # the probe batch: the default batch size, a sentence and a prompt long
REPEATS = 3  # timed passes per candidate (after one warm-up); the median decides
# Instruction-set flags that decide which kernels the libraries pick (and so what is fastest); the benchmarks
# record the same (bench/common.machine_info).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 units: what OpenVINO's bf16 runs on (runtime.openvino_backend)
CACHE_VERSION = 2  # 2: call_tokens


@dataclass(frozen=True)
class Choice:
    """How to run one graph on this CPU: the backend's variant and the token budget per call."""

    variant: str | None = None  # None: the backend's first (its default)
    token_budget: int | None = None  # None: the caller's whole batch in one call
    measured: dict = field(default_factory=dict)  # candidate -> median seconds of the probe, as timed
    call_tokens: int | None = None  # what one more call costs, in padded tokens; None: batches are not cut by it

    def to_json(self) -> dict:
        return {"variant": self.variant, "token_budget": self.token_budget, "call_tokens": self.call_tokens,
                "measured": self.measured}


UNTUNED = Choice()


@functools.cache  # a process runs on one CPU: read it once
def cpu() -> dict:
    """This CPU's model name and the CPU_FLAGS it has (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": None, "flags": []}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name"), "flags": [f for f in CPU_FLAGS if f in flags]}


def bf16_units() -> bool:
    """This CPU has bf16 instructions (AVX512_BF16 or AMX)."""
    return bool(set(BF16_FLAGS) & set(cpu()["flags"]))


def default_threads() -> int:
    # The cores this process may run on (a container or taskset may allow
    # fewer than the machine has).
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def enabled() -> bool:
    return os.environ.get("PTBUNDLE_TUNING", "on").lower() not in ("off", "0", "no", "false")


def cache_file() -> Path:
    root = os.environ.get("PTBUNDLE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "ptbundle"
    return Path(root) / "tuning.json"


def key_of(*parts) -> str:
    """The record's key: the CPU and every part given (backend and its version, threads, backbone, graph)."""
    return hashlib.sha256(json.dumps([CACHE_VERSION, cpu(), default_threads(), *parts],
                                     default=str).encode()).hexdigest()[:24]


def recorded(key: str) -> Choice | None:
    try:
        entry = json.loads(cache_file().read_text()).get(key)
        return Choice(entry["variant"], entry["token_budget"], entry.get("measured", {}),
                      entry.get("call_tokens")) if entry else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no record yet, or an unreadable one
        return None


def record(key: str, choice: Choice, about: dict) -> None:
    """Add the choice to the record, atomically (a process that reads it meanwhile sees the old or the new
    file); a record that cannot be written costs a measurement next time, nothing else."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        entries[key] = {**choice.to_json(), **about}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def probe(multi_task: bool) -> tuple:
    """A batch shaped like the default one (PROBE_ROWS rows of PROBE_SEQ tokens): id 0 (every vocabulary has it),
    every position attended; task 0 for a merged graph.  Timing does not depend on the ids."""
    ids = np.zeros((PROBE_ROWS, PROBE_SEQ), np.int32)
    arrays = (ids, np.ones_like(ids), np.zeros_like(ids))
    return arrays + ((np.zeros(PROBE_ROWS, np.int32),) if multi_task else ())


def chunks(rows: int, longest: int, budget: int | None) -> list:
    """Row slices of a batch of `rows` padded to `longest` tokens: calls of at most `budget` tokens, >= 1 row."""
    step = rows if budget is None else max(1, budget // max(1, longest))
    return [slice(i, i + step) for i in range(0, rows, step)]


def calls(lengths, budget: int | None, call_tokens: int | None) -> list:
    """Row slices of a batch whose rows are in order of length (`lengths`, ascending): the graph calls that cost
    least, a call costing `call_tokens` plus its rows times its longest (the padded tokens), each within
    `budget` tokens (or one row).  Without call_tokens, `chunks` of the whole batch."""
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    if call_tokens is None or n <= 1:
        return chunks(n, int(lengths.max(initial=1)), budget)
    # best[j]: the least cost of rows [0, j); a call of rows [i, j) pads them to lengths[j - 1]
    best, cut = np.zeros(n + 1), np.zeros(n + 1, np.int64)
    starts = np.arange(n)
    for j in range(1, n + 1):
        longest = max(1, int(lengths[j - 1]))
        cost = best[:j] + call_tokens + (j - starts[:j]) * longest
        if budget is not None:  # rows over the budget are not a candidate, unless alone
            cost[: max(0, j - max(1, budget // longest))] = np.inf
        cut[j] = int(np.argmin(cost))
        best[j] = cost[cut[j]]
    out, j = [], n
    while j > 0:
        out.append(slice(int(cut[j]), j))
        j = int(cut[j])
    return out[::-1]


def seconds(model, arrays: tuple, budget: int | None) -> float:
    """Median seconds of REPEATS passes of the probe through `model`, split by `budget` (after one warm-up)."""
    parts = chunks(len(arrays[0]), arrays[0].shape[1], budget)

    def run():
        for part in parts:
            model(*(a[part] for a in arrays))

    run()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tune(open_variant, variants: tuple, key: str, multi_task: bool, about: dict):
    """(model, Choice): the recorded choice for `key` on this CPU, or the fastest measured now and recorded.

    `open_variant(name)` opens the graph as the backend's variant `name` (`variants`, the default first)."""
    if not enabled():
        return open_variant(variants[0] if variants else None), UNTUNED
    known = recorded(key)
    if known is not None and (known.variant in variants or not variants):
        return open_variant(known.variant), known
    arrays = probe(multi_task)
    measured, models = {}, {}
    for name in variants or (None,):
        models[name] = open_variant(name)
        measured[f"{name}/whole"] = seconds(models[name], arrays, None)
    variant = min(models, key=lambda name: measured[f"{name}/whole"])
    model = models[variant]
    for budget in BUDGETS[1:]:
        measured[f"{variant}/{budget}"] = seconds(model, arrays, budget)
    best = min(BUDGETS, key=lambda b: measured[f"{variant}/{'whole' if b is None else b}"])
    # One call's cost in padded tokens: a call of one short row, against the probe's time per padded token
    # (the short row's own tokens and the per-row work a call of any size does are counted in, a little).
    short = PROBE_SEQ // 4
    measured["call/1x8"] = seconds(model, tuple(a[:1, :short] if a.ndim == 2 else a[:1] for a in arrays), None)
    per_token = measured[f"{variant}/{'whole' if best is None else best}"] / (PROBE_ROWS * PROBE_SEQ)
    call_tokens = max(0, round(measured["call/1x8"] / per_token) - short)
    choice = Choice(variant, best, {k: round(v, 6) for k, v in measured.items()}, call_tokens)
    record(key, choice, {**about, "cpu": cpu(), "probe": [PROBE_ROWS, PROBE_SEQ],
                         "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return model, choice
