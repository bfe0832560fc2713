"""What the runtime's mistake tests share: pt-run as a user runs it, bundle copies to damage, a generation bundle."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from checkpoints import write_llama_checkpoint

BIN = Path(sys.executable).parent
CHAT = "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def pt_run(*args, stdin=b"", env=None):
    """(exit status, stderr, stdout) of a real pt-run process."""
    done = subprocess.run([str(BIN / "pt-run"), *map(str, args)], input=stdin, capture_output=True, timeout=300,
                          env=env)
    return done.returncode, done.stderr.decode("utf-8", "replace"), done.stdout.decode("utf-8", "replace")


def assert_one_error_line(code, stderr, *expected):
    """Exit 1, no traceback, one `Error: ` line holding every `expected` text."""
    assert code == 1, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr
    for text in expected:
        assert text in errors[0], errors[0]


def copy_bundle(bundle: Path, destination: Path) -> Path:
    shutil.copytree(bundle, destination)
    return destination


def edit_manifest(bundle: Path, change) -> None:
    """`change(manifest)` on the raw JSON of the bundle's manifest.json, as a hand edit would."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def write_chat_bundle(directory: Path) -> Path:
    """A generation bundle written by the builder's real writer (as test_generate.py's are) on a tiny random
    Llama: no learned prompt, a chat template."""
    from safetensors.numpy import load_file

    from ptbundle.builder.backbones.architectures.llama import LLAMA
    from ptbundle.builder.backbones.configs import decoder_config
    from ptbundle.builder.bundles.generation import write_generation_bundle
    from ptbundle.runtime.format import BackboneInfo

    checkpoint = write_llama_checkpoint(Path(directory) / "tiny-llama")
    cfg = decoder_config(LLAMA, json.loads((checkpoint / "config.json").read_text()), checkpoint / "config.json")
    backbone = BackboneInfo("tiny-llama", "llama", cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                            cfg.intermediate_size, cfg.vocab_size, "0" * 64)
    out = Path(directory) / "chat"
    write_generation_bundle(out, load_file(str(checkpoint / "model.safetensors")), cfg,
                            checkpoint / "tokenizer.json", None, name="tiny-chat", template=CHAT, details={},
                            backbone=backbone, mindir_capacity=64)
    return out
