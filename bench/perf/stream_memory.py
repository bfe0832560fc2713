"""Memory of `pt-run predict` on a large file: it streams, so peak RSS should not grow with the file.

    .venv/bin/python bench/perf/stream_memory.py [--bundle exports/mr-soft | --tiny] [--size-mb 1024,64,8]

For each size, writes a text file of that many MB of MR sentences, each line
made unique by a " #<line number>" suffix, runs `pt-run predict FILE` in a
new process with its output to a file, and records wall time, lines/s and
the process's peak RSS (getrusage of the child, and /proc samples every
0.5 s for the curve).  The output is then read back a line at a time: one
line per input line, each ending with its own line's suffix (input order).
MiniLM predicts about 140 lines/s on 2 cores, so a 1 GB file (8 million
lines) takes it most of a day: --tiny builds a bundle on a tiny random
checkpoint (tests/checkpoints.py) instead, which measures what streaming
costs (reading, tokenizing, batching, writing) with the model's work made
small.  Writes <results>/stream_memory.json; the files go to a temporary
directory that is removed.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402


def write_input(path: Path, size: int, texts: list) -> int:
    lines = 0
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < size:
            line = f"{texts[lines % len(texts)]} #{lines}\n"
            f.write(line)
            written += len(line.encode())
            lines += 1
    return lines


def sample_rss(pid: int, samples: list, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        kb = next((int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS:")), None)
        if kb:
            samples.append(round(kb / 1024, 1))


def run_predict(bundle: str, source: Path, out: Path, chunk_lines: int) -> dict:
    """One pt-run predict in a new process: seconds and peak RSS (MB)."""
    started = time.perf_counter()
    with open(out, "wb") as sink:
        process = subprocess.Popen([common.tool("pt-run"), "predict", str(source), "--bundle", bundle,
                                    "--chunk-lines", str(chunk_lines), "--no-progress"], stdout=sink,
                                   stderr=subprocess.PIPE)
        samples, stop = [], threading.Event()
        watcher = threading.Thread(target=sample_rss, args=(process.pid, samples, stop), daemon=True)
        watcher.start()
        _, err = process.communicate()
        stop.set()
    seconds = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"pt-run predict failed: {err.decode()[-500:]}")
    # ru_maxrss of the children waited for so far: each size runs in a new process of this script
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1), "rss_samples_mb": samples[:: max(1, len(samples) // 40)]}


def check_output(out: Path, lines: int) -> int:
    """Output lines, each ending with its input line's suffix (in order); the count must match."""
    n = 0
    with open(out, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.rstrip("\n").endswith(f" #{n - 1}"):
                raise SystemExit(f"output line {n} is not input line {n}'s: {line[:120]!r}")
    if n != lines:
        raise SystemExit(f"{lines} input lines but {n} output lines")
    return n


def tiny_bundle(directory: Path) -> str:
    sys.path.insert(0, str(common.ROOT / "tests"))
    from checkpoints import write_checkpoint

    checkpoint = write_checkpoint(directory / "tiny-bert", "bert")
    data = directory / "toy.tsv"
    data.write_text("text\tlabel\n" + "a great movie\tpos\nthe worst film\tneg\n" * 16)
    built = subprocess.run([common.tool("pt-build"), "export", "--prompt", "soft", "--train", str(data), "--dev", str(data),
                    "--backbone", str(checkpoint), "--epochs", "1", "--batch-size", "8", "--virtual-tokens", "4",
                    "--out", str(directory), "--name", "tiny"], capture_output=True, text=True)
    if built.returncode:
        raise SystemExit(f"pt-build export of the tiny bundle failed ({built.returncode}): {built.stderr[-2000:]}")
    return str(directory / "tiny")


@click.command()
@click.option("--bundle", default="exports/mr-soft", show_default=True)
@click.option("--tiny", is_flag=True, help="Build and use a bundle on a tiny random checkpoint (fast model).")
@click.option("--size-mb", default="1024", show_default=True, help="Comma-separated file sizes, MB.")
@click.option("--chunk-lines", default=4096, show_default=True)
@common.options()
def main(bundle, tiny, size_mb, chunk_lines, backbone, data, smoke, results):
    sizes = [float(s) for s in size_mb.split(",")]
    if smoke:
        sizes, tiny = [0.05, 0.2], True
    texts = [" ".join(e.text.split()) for e in common.load_data(data).train]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if tiny:
            bundle = tiny_bundle(tmp)
        for size in sizes:
            source, out = tmp / "input.txt", tmp / "output.txt"
            lines = write_input(source, int(size * 2**20), texts)
            # A new interpreter for each size, so getrusage's children maximum is this size's alone.
            code = ("import json, sys; sys.path.insert(0, %r); import stream_memory as s; "
                    "print(json.dumps(s.run_predict(%r, s.Path(%r), s.Path(%r), %d)))"
                    % (str(Path(__file__).parent), bundle, str(source), str(out), chunk_lines))
            measured = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            row = {"size_mb": size, "lines": lines, **json.loads(measured.stdout.splitlines()[-1])}
            row["output_lines_in_order"] = check_output(out, lines)
            row["lines_per_second"] = round(lines / row["seconds"], 1)
            rows.append(row)
            print(f"{size:>8g} MB {lines:>9} lines: {row['seconds']} s ({row['lines_per_second']} lines/s), peak RSS"
                  f" {row['peak_rss_mb']} MB, output in order", flush=True)
            os.remove(source)
            os.remove(out)
    common.write_results(results, "stream_memory", {"machine": common.machine_info(), "bundle": bundle,
                                                      "tiny": tiny, "chunk_lines": chunk_lines, "rows": rows})


if __name__ == "__main__":
    main()
