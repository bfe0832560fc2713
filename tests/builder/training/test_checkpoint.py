"""Checkpoints and resume: a real pt-build process killed with SIGKILL mid-epoch, resumed, and compared."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MIXED_TEXTS
from ptbundle.runtime import Bundle

PT_BUILD = str(Path(sys.executable).parent / "pt-build")


def build(tmp, files, tiny_bert, name, *extra, kill_after=None):
    train, dev = files
    env = {**os.environ}
    if kill_after is not None:
        env["PTBUNDLE_KILL_AFTER_STEP"] = str(kill_after)
    return subprocess.run([PT_BUILD, "export", "--prompt", "soft", "--train", str(train), "--dev", str(dev),
                           "--backbone", str(tiny_bert), "--virtual-tokens", "4", "--epochs", "3", "--batch-size", "8",
                           "--prompt-lr", "0.05", "--head-lr", "0.05", "--checkpoint-every", "3", "--out", str(tmp),
                           "--name", name, *extra], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, toy_files, tiny_bert):
    out = tmp_path_factory.mktemp("whole")
    done = build(out, toy_files, tiny_bert, "b")
    assert done.returncode == 0, done.stderr
    assert not (out / ".b.checkpoint.safetensors").exists()  # removed once the bundle is written
    return out / "b"


@pytest.mark.parametrize("kill_after", [5, 8, 13], ids=["mid-epoch-1", "epoch-end", "mid-epoch-2"])
def test_a_killed_run_resumes_to_the_same_bundle(tmp_path, toy_files, tiny_bert, uninterrupted, kill_after):
    # 64 toy rows, batches of 8: 8 steps an epoch; checkpoints at steps 3, 6, epoch ends (8, 16), 9, 12, 15...
    killed = build(tmp_path, toy_files, tiny_bert, "b", kill_after=kill_after)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "b").exists() and (tmp_path / ".b.checkpoint.safetensors").is_file()
    resumed = build(tmp_path, toy_files, tiny_bert, "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming epoch" in resumed.stderr
    a, b = Bundle.load(uninterrupted), Bundle.load(tmp_path / "b")
    np.testing.assert_array_equal(a.logits(MIXED_TEXTS), b.logits(MIXED_TEXTS))
    assert a.manifest.only.metrics["dev"] == b.manifest.only.metrics["dev"]
    curve = lambda bundle: [{k: v for k, v in p.items() if k != "seconds"} for p in
                            __import__("json").loads((bundle.directory / "training_log.json").read_text())]
    assert curve(a) == curve(b)


def test_resume_refuses_another_runs_checkpoint_and_a_missing_one(tmp_path, toy_files, tiny_bert):
    nothing = build(tmp_path, toy_files, tiny_bert, "b", "--resume")
    assert nothing.returncode == 1 and "no checkpoint at" in nothing.stderr and "Traceback" not in nothing.stderr
    assert build(tmp_path, toy_files, tiny_bert, "b", kill_after=5).returncode == -signal.SIGKILL
    other = build(tmp_path, toy_files, tiny_bert, "b", "--resume", "--seed", "1")
    assert other.returncode == 1 and "written by another run" in other.stderr and "Traceback" not in other.stderr


def test_ctrl_c_says_how_to_go_on_and_resume_gives_the_same_bundle(tmp_path, toy_files, tiny_bert, uninterrupted):
    """A real SIGINT (Ctrl-C) mid-epoch: one line naming the saved state and --resume, exit 130, no bundle; the
    resumed run ends in the bundle an uninterrupted run writes."""
    train, dev = toy_files
    process = subprocess.Popen([PT_BUILD, "export", "--prompt", "soft", "--train", str(train), "--dev", str(dev),
                                "--backbone", str(tiny_bert), "--virtual-tokens", "4", "--epochs", "3",
                                "--batch-size", "8", "--prompt-lr", "0.05", "--head-lr", "0.05",
                                "--checkpoint-every", "3", "--out", str(tmp_path), "--name", "b"],
                               stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:  # progress lines, one per step here (8 steps an epoch): the checkpoint at 3 is saved
        lines.append(line)
        if line.startswith("epoch 1/3: 5/8"):
            process.send_signal(signal.SIGINT)
            break
    try:  # bounded: a Ctrl-C that hangs the build fails here instead of stopping the suite
        rest = process.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("pt-build hung after Ctrl-C: " + "".join(lines))
    assert process.returncode == 130, "".join(lines) + rest
    assert "Traceback" not in rest and not (tmp_path / "b").exists()
    assert f"training state at {tmp_path / '.b.checkpoint.safetensors'} goes on with the same command and --resume" \
        in rest
    resumed = build(tmp_path, toy_files, tiny_bert, "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_array_equal(Bundle.load(uninterrupted).logits(MIXED_TEXTS),
                                  Bundle.load(tmp_path / "b").logits(MIXED_TEXTS))
