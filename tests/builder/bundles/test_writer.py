"""The one bundle writer never loses a user's files: a destination that is not a bundle, a bundle with files it
does not list, or a bundle of another backbone is refused before any work, by every pt-build command (issue:
`pt-build merge ... --out myexports` wiped the folder of bundles it was merging)."""

import json
import shutil

from click.testing import CliRunner

from checkpoints import FIXTURES, write_llama_checkpoint
from ptbundle.builder.cli import cli as build_cli


def run(*args):
    result = CliRunner().invoke(build_cli, [str(a) for a in args])
    return result.exit_code, result.output


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_merge_into_the_folder_of_its_sources_is_refused_and_loses_nothing(tmp_path, tiny_build, tiny_bert):
    folder = tmp_path / "myexports"
    shutil.copytree(tiny_build[0] / "toy-hard-probe", folder / "toy-hard-probe")
    shutil.copytree(tiny_build[0] / "toy-hard-zeroshot", folder / "toy-hard-zeroshot")
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    code, output = run("merge", f"probe={folder / 'toy-hard-probe'}", f"zs={folder / 'toy-hard-zeroshot'}",
                       "--backbone", tiny_bert, "--out", folder)
    assert code == 1 and "is a directory that is not a bundle" in output and str(folder) in output
    assert snapshot(folder) == before


def test_export_over_a_bundle_holding_a_users_file_is_refused_before_training(tmp_path, tiny_build, tiny_bert,
                                                                                toy_files):
    out = tmp_path / "out13"
    shutil.copytree(tiny_build[0] / "toy-soft", out / "keep")
    (out / "keep" / "thesis.txt").write_text("two years of work")
    before = snapshot(out)
    code, output = run("export", "--prompt", "soft", "--train", toy_files[0], "--dev", toy_files[1],
                       "--backbone", tiny_bert, "--out", out, "--name", "keep")
    assert code == 1 and "thesis.txt" in output and "epoch" not in output
    assert snapshot(out) == before


def test_import_over_the_adapter_folder_itself_is_refused(tmp_path, tiny_bert):
    adapters = tmp_path / "adtest"
    shutil.copytree(FIXTURES / "peft_adapters" / "bert-prompt-tuning", adapters / "myad")
    before = snapshot(adapters)
    code, output = run("import", adapters / "myad", "--backbone", tiny_bert, "--out", tmp_path, "--name", "adtest")
    assert code == 1 and "not a bundle" in output
    assert snapshot(adapters) == before


def test_a_bundle_of_another_backbone_is_not_replaced(tmp_path, tiny_build, toy_files):
    """The decoder command under default names would have written over the MiniLM bundles."""
    out = tmp_path / "exports"
    shutil.copytree(tiny_build[0] / "toy-soft", out / "toy-soft")
    before = snapshot(out)
    llama = write_llama_checkpoint(tmp_path / "llama")
    code, output = run("export", "--prompt", "soft", "--train", toy_files[0], "--dev", toy_files[1],
                       "--backbone", llama, "--out", out, "--name", "toy-soft", "--max-length", "64")
    assert code == 1 and "holds a bundle of another backbone" in output and "--name" in output
    assert snapshot(out) == before


def test_a_bundle_of_the_same_backbone_is_replaced_whole(tmp_path, tiny_build, tiny_bert, toy_files):
    out = tmp_path / "exports"
    shutil.copytree(tiny_build[0] / "toy-soft", out / "toy")
    old = json.loads((out / "toy" / "manifest.json").read_text())["created"]
    code, output = run("export", "--prompt", "soft", "--train", toy_files[0], "--dev", toy_files[1],
                       "--backbone", tiny_bert, "--out", out, "--name", "toy", "--virtual-tokens", "2",
                       "--epochs", "1", "--batch-size", "16", "--max-length", "32")
    assert code == 0, output
    manifest = json.loads((out / "toy" / "manifest.json").read_text())
    assert manifest["tasks"][0]["num_virtual_tokens"] == 2 and set(manifest["files"]) == set(snapshot(out / "toy")) - {
        "manifest.json"} and manifest["created"] >= old
