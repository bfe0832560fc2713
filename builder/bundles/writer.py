"""The one bundle writer: every kind of bundle (classifier, merged, generation) is written into a hidden
directory beside its destination, sealed (file modes, sha256 of every file, library versions, time, the
manifest last) and moved into place whole.  A failure or Ctrl-C at any point leaves no partial bundle, and
a destination that holds anything but a bundle is never replaced."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import mindspore as ms
import onnx
import onnxruntime
import tokenizers

from ptbundle.runtime.errors import PtbundleError
from ptbundle.runtime.format import MANIFEST, Manifest, bundle_files, sha256_file

from ..errors import BuildError


def write_atomically(destination, fill: Callable[[Path], Manifest]) -> Manifest:
    """`fill(directory)` writes the bundle's files and returns its manifest; this seals it and puts it at
    `destination` (replacing a bundle there whole); the manifest written."""
    destination = Path(destination)
    check_replaceable(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = seal(tmp, fill(tmp))
        replace_directory(tmp, destination)
    except BaseException:  # Ctrl-C included: never leave a half bundle
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def seal(directory: Path, manifest: Manifest) -> Manifest:
    """Every file readable, hashed into the manifest with the time and library versions; the manifest written."""
    files = bundle_files(directory)  # nested ones by their relative path: "peft/adapter_config.json"
    for name in files:
        (directory / name).chmod(0o644)  # MindSpore writes the graph read-only for its owner
    manifest = manifest.replace(
        files={name: sha256_file(directory / name) for name in files},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=library_versions())
    manifest.write(directory)
    return manifest


def library_versions() -> dict:
    return {"python": platform.python_version(), "mindspore": ms.__version__, "numpy": np.__version__,
            "tokenizers": tokenizers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def check_replaceable(destination: Path, backbone_sha256: str | None = None) -> None:
    """A bundle is written where nothing is, over an empty directory, or over a bundle of the same backbone with no
    file its manifest does not list; anything else is refused before any work: `--out exports` must never wipe a
    folder of bundles or notes, nor a decoder build under the default names the MiniLM bundles."""
    if not destination.exists():
        return
    if not destination.is_dir():
        raise BuildError(f"{destination} is a file, not a bundle directory: choose another destination")
    if not any(destination.iterdir()):
        return
    try:
        old = Manifest.read(destination)  # the format's own reader: any version a bundle may be in
    except PtbundleError as e:
        raise BuildError(f"{destination} is a directory that is not a bundle ({e}); a bundle written there would"
                         f" replace everything in it: choose another destination, or remove it first") from None
    strays = sorted(set(bundle_files(destination)) - set(old.files) - {MANIFEST})
    if strays:
        raise BuildError(f"{destination} holds files its bundle does not list ({', '.join(strays[:3])}); writing"
                         f" the new bundle there would delete them: choose another destination, or move them")
    if backbone_sha256 and old.backbone.sha256 != backbone_sha256:
        raise BuildError(f"{destination} holds a bundle of another backbone ({old.backbone.name}); choose another"
                         f" name (--name) or remove it first")


def replace_directory(new: Path, destination: Path) -> None:
    """Put `new` at `destination`; an existing bundle there is replaced whole."""
    if destination.exists():
        old = destination.parent / f".{destination.name}.old-{os.getpid()}"
        os.replace(destination, old)
        os.replace(new, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, destination)
