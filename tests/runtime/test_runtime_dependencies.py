"""The runtime's declared dependencies (pyproject.toml's `dependencies`, what `pip install ./ptbundle` brings)
cover every import on its paths, and a feature needing an extra says which, in one line.

Two checks: a fresh process runs every kind of bundle (a classifier's predict, a generation bundle's generate)
and every package it imported must come from the declared dependencies or theirs; and every import written in
runtime/, a function's lazy ones included, names a declared dependency or an extra this file lists.
"""

import ast
import importlib.metadata as metadata
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from checkpoints import ROOT
from helpers import assert_one_error_line, write_chat_bundle

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The runtime's features that need an extra (each refuses in one line naming it when it is missing): import -> extra.
EXTRA_IMPORTS = {"mindspore": "mindspore", "uvicorn": "serve", "prometheus_client": "serve", "matplotlib": "plot",
                 "openvino": "openvino"}


def declared() -> set:
    return {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}


def closure(names: set) -> set:
    """The distributions `names` install, theirs included (no extras)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for r in metadata.requires(name) or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def distributions_of(module: str) -> set:
    return {canonicalize_name(d) for d in metadata.packages_distributions().get(module, [])}


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_bundle(tmp_path_factory.mktemp("chat"))


def test_every_kind_of_bundle_runs_on_the_declared_dependencies(tiny_bundle, chat):
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import ptbundle.runtime.cli, ptbundle.runtime.serve, ptbundle.runtime.evaluate\n"
        "from ptbundle.runtime import Bundle\n"
        f"print(Bundle.load({str(tiny_bundle)!r}).predict('a great movie')[0].label)\n"
        f"print(repr(Bundle.load({str(chat)!r}).generate('hello', max_new_tokens=3).text))\n"
        "new = [m for m in set(sys.modules) - before if getattr(sys.modules[m], '__file__', None)]  # not builtins\n"
        "print(' '.join(sorted({m.split('.')[0] for m in new})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    label, _, imported = done.stdout.splitlines()
    assert label in ("neg", "pos")
    allowed = closure(declared())
    third_party = [m for m in imported.split() if m not in sys.stdlib_module_names and m != "ptbundle"
                   and not m.startswith("_")]
    assert "safetensors" in third_party and "tokenizers" in third_party
    outside = {m: distributions_of(m) for m in third_party if not distributions_of(m) & allowed}
    assert not outside, f"imported from outside the runtime's declared dependencies: {outside}"


def imports_of(path) -> set:
    """The top-level names of every absolute import in a source file, in functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "runtime").glob("*.py")), ids=lambda p: p.name)
def test_every_import_in_runtime_is_declared(path):
    deps, extras = declared(), PYPROJECT["project"]["optional-dependencies"]
    for name in sorted(imports_of(path) - set(sys.stdlib_module_names) - {"ptbundle", "__future__"}):
        if name in EXTRA_IMPORTS:
            extra = extras[EXTRA_IMPORTS[name]]
            assert any(canonicalize_name(Requirement(r).name) == canonicalize_name(name) for r in extra), (name, extra)
            continue
        assert distributions_of(name) & deps, f"{path.name} imports {name}, not a dependency of the runtime"


@pytest.mark.parametrize("module, args, expected", [
    ("mindspore", ["predict", "--bundle", "{bundle}", "--backend", "mindspore", "-"],
     "the mindspore backend needs MindSpore"),
    ("uvicorn", ["serve", "{bundle}", "--port", "0"], "pt-run serve needs the serve extra"),
    ("prometheus_client", ["serve", "{bundle}", "--port", "0"], "pt-run serve needs the serve extra"),
    ("openvino", ["predict", "--bundle", "{bundle}", "--precision", "bf16", "-"],
     "the openvino backend needs OpenVINO"),
], ids=["mindspore", "serve", "serve-metrics", "openvino"])
def test_a_missing_extra_is_one_line_naming_it(tiny_bundle, module, args, expected):
    code = (f"import sys; sys.modules[{module!r}] = None  # as if not installed\n"
            "from ptbundle.runtime.cli import main\n"
            f"sys.argv = ['pt-run', *{[a.format(bundle=tiny_bundle) for a in args]!r}]\n"
            "main()\n")
    done = subprocess.run([sys.executable, "-c", code], input=b"a great movie\n", capture_output=True, timeout=300)
    assert_one_error_line(done.returncode, done.stderr.decode(), expected,
                          f"pip install 'ptbundle[{EXTRA_IMPORTS[module]}]'")
