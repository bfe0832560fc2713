"""Data parallel under MindSpore's msrun: 2 CPU worker processes on the tiny checkpoint."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

BIN = Path(sys.executable).parent
RECIPE = ["--prompt", "soft", "--virtual-tokens", "4", "--epochs", "2", "--prompt-lr", "0.05", "--head-lr", "0.05"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(tmp, files, tiny_bert, name, batch, env=None):
    train, dev = files
    logs = tmp / f"logs-{name}"
    command = [str(BIN / "msrun"), "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(free_port()),
               "--log_dir", str(logs), "--join", "True", str(BIN / "pt-build"), "export", *RECIPE,
               "--train", str(train), "--dev", str(dev), "--backbone", str(tiny_bert), "--batch-size", str(batch),
               "--out", str(tmp), "--name", name]
    # msrun starts `python` from PATH: this environment's
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    return done, logs


def test_two_workers_train_what_one_process_trains_with_the_doubled_batch(tmp_path, toy_files, tiny_bert):
    train, dev = toy_files
    one = subprocess.run([str(BIN / "pt-build"), "export", *RECIPE, "--train", str(train), "--dev", str(dev),
                          "--backbone", str(tiny_bert), "--batch-size", "8", "--out", str(tmp_path), "--name", "one"],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    done, logs = msrun(tmp_path, toy_files, tiny_bert, "two", 4)
    assert done.returncode == 0, done.stdout[-2000:] + "".join(p.read_text()[-2000:] for p in logs.glob("*.log"))
    a, b = load_file(str(tmp_path / "one" / "prompt.safetensors")), load_file(str(tmp_path / "two" / "prompt.safetensors"))
    assert set(a) == set(b) == {"prompt_embeddings", "classifier.weight", "classifier.bias"}
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"2 workers x 4 vs 1 process x 8: max abs difference {worst:.2e}")  # docs/measured.md's figure
    assert worst <= 1e-5, worst  # reduction order only (docs/training.md)
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())["tasks"][0]
    assert m["metrics"]["workers"] == 2 and m["recipe"]["batch_size"] == 4
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("logs")) == ["one", "two"]  # rank 0 wrote
    ranks = sorted(line.split(" of ")[0] for p in logs.glob("worker_*.log") for line in p.read_text().splitlines()
                   if line.startswith("pt-build: worker rank"))
    assert ranks == ["pt-build: worker rank 0", "pt-build: worker rank 1"]


def test_a_worker_that_dies_stops_the_run(tmp_path, toy_files, tiny_bert):
    done, logs = msrun(tmp_path, toy_files, tiny_bert, "dead", 4, {"PTBUNDLE_KILL_AFTER_STEP": "3:1"})
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert "exit with exception" in said and "-9" in said, said[-3000:]
    pid = said.split("Worker process ")[1].split()[0]
    assert f"pt-build: worker rank 1 of 2, pid {pid}" in (logs / "worker_1.log").read_text()  # the pid is rank 1
    assert not (tmp_path / "dead").exists()
