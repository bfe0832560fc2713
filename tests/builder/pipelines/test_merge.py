"""pt-build merge: real bundles from the tiny checkpoints merged by the real CLI, and the merged graphs run back."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from conftest import MIXED_TEXTS as TEXTS, build, mixed_rows
from ptbundle.builder.cli import cli as build_cli
from ptbundle.runtime import Bundle
from ptbundle.runtime.cli import cli as run_cli
import onnx  # after MindSpore (builder.cli): the other order breaks protobuf

def test_merged_manifest_keeps_every_task(merged_bundle):
    out, sources = merged_bundle
    m = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in m["tasks"]] == list(sources)
    assert m["signature"]["inputs"]["task_ids"] == {"dtype": "int32", "axes": ["batch"]}
    several = "not expressible: several tasks in one graph (a PEFT adapter holds one prompt and head)"
    for task in m["tasks"]:
        own = json.loads((sources[task["name"]] / "manifest.json").read_text())["tasks"][0]
        # everything but the PEFT adapter: a merged bundle has no peft/ (a source with cls pooling has one)
        assert task["details"].pop("peft") == several and own["details"].pop("peft").startswith(("peft", "not"))
        assert {k: v for k, v in task.items() if k != "name"} == {k: v for k, v in own.items() if k != "name"}
    assert json.loads((sources["pairs"] / "manifest.json").read_text())["tasks"][0]["details"]["peft"] == "peft"
    assert set(m["export"]) == {"mindir", "onnx", "sources", "sources_checked"} and m["export"]["sources"] <= 1e-4
    assert m["export"]["sources_checked"] == 7  # every task: fewer than SOURCE_SAMPLE sources
    assert "model.int8.onnx" not in m["files"]


@pytest.mark.parametrize("backend", ["onnxruntime", "mindspore"])
def test_mixed_batches_predict_what_each_bundle_predicts(merged_bundle, backend):
    out, sources = merged_bundle
    merged = Bundle.load(out, backend=backend)
    singles = {name: Bundle.load(path) for name, path in sources.items()}
    rows = mixed_rows(60)
    got = merged.logits([r[1] for r in rows], [r[2] for r in rows], batch_size=16, task=[r[0] for r in rows])
    assert got.shape == (60, 3)
    for i, (task, a, b) in enumerate(rows):
        want = singles[task].logits([a], None if b is None else [b])[0]
        np.testing.assert_allclose(got[i, : len(want)], want, atol=1e-4)
        assert np.isnan(got[i, len(want):]).all()  # a two-label task's row is padded past its labels
    predictions = merged.predict([r[1] for r in rows], [r[2] for r in rows], task=[r[0] for r in rows])
    for (task, a, b), p in zip(rows, predictions):
        assert p.task == task and set(p.probabilities) == set(singles[task].labels)


def test_a_row_does_not_depend_on_its_batch(merged_bundle):
    merged = Bundle.load(merged_bundle[0])
    rows = mixed_rows(30, seed=1)
    together = merged.logits([r[1] for r in rows], [r[2] for r in rows], batch_size=30, task=[r[0] for r in rows],
                             sort_by_length=False)
    for i, (task, a, b) in enumerate(rows):
        alone = merged.logits([a], None if b is None else [b], task=task)[0]
        np.testing.assert_allclose(together[i, : len(alone)], alone, atol=1e-5)


def test_predict_and_eval_by_task(merged_bundle, toy_files):
    out = merged_bundle[0]
    runner = CliRunner()
    lines = [{"task": "pairs", "text": "a great movie", "text_b": "the best film"},
             {"task": "sentiment", "text": "a great movie"}, {"task": "probe", "text": "the worst film ever"}]
    result = runner.invoke(run_cli, ["predict", "-", "--bundle", str(out), "--input-format", "jsonl",
                                     "--format", "jsonl"],
                           input="".join(json.dumps(line) + "\n" for line in lines))
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [g["task"] for g in got] == ["pairs", "sentiment", "probe"]  # each line's own (--task may not differ)
    assert set(got[0]["probabilities"]) == {"same", "opposite", "other"}
    no_task = runner.invoke(run_cli, ["predict", "-", "--bundle", str(out)], input="a great movie\n")
    assert no_task.exit_code == 1 and "<stdin>:1: no task" in no_task.output
    scored = runner.invoke(run_cli, ["eval", "--bundle", str(out), "--task", "sentiment", "--data",
                                     str(toy_files[1]), "--json"])
    assert scored.exit_code == 0, scored.output
    recorded = json.loads((merged_bundle[1]["sentiment"] / "manifest.json").read_text())["tasks"][0]["metrics"]
    assert json.loads(scored.stdout)["results"][0]["accuracy"] == pytest.approx(recorded["dev"]["accuracy"])
    info = runner.invoke(run_cli, ["info", str(out)])
    assert "7 tasks in one graph: sentiment, zeroshot, probe, pairs, prefix, prefix1, late" in info.stdout


def merge_error(args):
    result = CliRunner().invoke(build_cli, ["merge", *map(str, args)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    return result.output


def test_merge_refuses_what_it_cannot_merge(merged_bundle, tiny_build, tiny_roberta, tiny_bert, tmp_path):
    exports = tiny_build[0]
    soft, probe = merged_bundle[1]["sentiment"], exports / "toy-hard-probe"
    other = tmp_path / "other"
    pairs_data = str(merged_bundle[1]["pairs"].parent / "train.tsv")
    build(["export", "--train", pairs_data, "--dev", pairs_data, "--text-column", "s1",
           "--text-b-column", "s2", "--label-column", "q", "--backbone", str(tiny_roberta), "--virtual-tokens", "2",
           "--method", "prompt-tuning", "--epochs", "1", "--batch-size", "8", "--prompt", "soft", "--out", str(tmp_path), "--name", "other"])
    assert "backbone sha256 differs" in merge_error([soft, other, "--out", tmp_path / "m", "--backbone", tiny_bert])
    assert "appears twice" in merge_error([f"same={soft}", f"same={probe}", "--out", tmp_path / "m",
                                           "--backbone", tiny_bert])
    assert "one of the bundles being merged" in merge_error([f"a={soft}", f"b={probe}", "--out", soft,
                                                             "--backbone", tiny_bert])
    assert "no such bundle directory" in merge_error([soft, tmp_path / "nope", "--out", tmp_path / "m"])
    assert "is not the bundles' backbone" in merge_error([f"a={soft}", f"b={probe}", "--out", tmp_path / "m",
                                                          "--backbone", tiny_roberta])
    corrupt = tmp_path / "corrupt"
    shutil.copytree(probe, corrupt)
    (corrupt / "prompt.safetensors").write_bytes(b"x" + (corrupt / "prompt.safetensors").read_bytes()[1:])
    assert "sha256" in merge_error([f"a={soft}", f"b={corrupt}", "--out", tmp_path / "m", "--backbone", tiny_bert])
    assert not (tmp_path / "m").exists()  # nothing half-written by any refusal


def test_merged_bundles_merge_again(merged_bundle, tiny_build, tiny_bert, tmp_path):
    out, sources = merged_bundle
    again = tmp_path / "again"
    build(["merge", str(out), f"extra={sources['sentiment']}", "--out", str(again), "--backbone", str(tiny_bert)])
    merged = Bundle.load(again)
    assert merged.task_names == ["sentiment", "zeroshot", "probe", "pairs", "prefix", "prefix1", "late", "extra"]
    np.testing.assert_allclose(merged.logits(TEXTS, task="extra"), merged.logits(TEXTS, task="sentiment"), atol=1e-5)
    np.testing.assert_allclose(Bundle.load(again, backend="mindspore").logits(TEXTS, task="extra"),
                               merged.logits(TEXTS, task="sentiment"), atol=1e-5)


def test_task_tables_are_stored_once_and_fed_to_every_graph(merged_bundle, tiny_bert, tmp_path):
    """The tables live in prompt.safetensors alone: each graph takes them as inputs, so a graph does not grow with
    the tasks it serves (7 tasks and 14 give graphs of one size)."""
    out, sources = merged_bundle
    tables = load_file(str(out / "prompt.safetensors"))
    pooler = {k: tables.pop(k) for k in ("backbone.pooler.weight", "backbone.pooler.bias")}  # BERT's, recorded
    assert pooler["backbone.pooler.weight"].shape == (32, 32) and pooler["backbone.pooler.bias"].shape == (32,)
    assert tables and all(k.startswith("task.") for k in tables)
    assert tables["task.classifier.weight"].shape[0] == 7 and tables["task.past.1"].shape[1] == 7
    for graph in ("model.onnx", "model.int8.onnx"):
        if not (out / graph).exists():
            continue
        model = onnx.load(str(out / graph))
        assert not [t.name for t in model.graph.initializer if t.name.startswith("task.")]
        assert {i.name for i in model.graph.input} == {"input_ids", "attention_mask", "token_type_ids", "task_ids",
                                                       *tables}
    twice = tmp_path / "twice"
    build(["merge", str(out), *(f"{k}2={v}" for k, v in sources.items()), "--out", str(twice),
           "--backbone", str(tiny_bert)])
    for graph in ("model.onnx", "model.mindir"):
        assert abs((twice / graph).stat().st_size - (out / graph).stat().st_size) < 1024, graph
    assert (twice / "prompt.safetensors").stat().st_size > 1.9 * (out / "prompt.safetensors").stat().st_size
    doubled = Bundle.load(twice)
    np.testing.assert_array_equal(doubled.logits(TEXTS, task="late2"), doubled.logits(TEXTS, task="late"))


def test_one_builds_bundles_merge_without_renaming_and_keep_their_names(tmp_path, tiny_build, tiny_bert):
    """A task is named after its bundle: served, predicted and merged under one name, so the bundles of one
    pt-build export merge with no NAME= (they were all named after the data before, and clashed)."""
    out = tiny_build[0]
    sources = [out / "toy-hard-zeroshot", out / "toy-hard-probe"]
    assert [Bundle.load(s).manifest.only.name for s in sources] == ["toy-hard-zeroshot", "toy-hard-probe"]
    build(["merge", *map(str, sources), "--backbone", str(tiny_bert), "--out", str(tmp_path / "both")])
    merged = Bundle.load(tmp_path / "both")
    assert merged.manifest.task_names == ["toy-hard-zeroshot", "toy-hard-probe"]
    result = CliRunner().invoke(run_cli, ["predict", "--bundle", str(tmp_path / "both"), "--task", "toy-hard-probe",
                                          "--format", "jsonl", "-"], input="\n".join(TEXTS) + "\n")
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in result.stdout.splitlines()]
    own = Bundle.load(sources[1]).predict(TEXTS)
    assert [(g["task"], g["label"]) for g in got] == [("toy-hard-probe", p.label) for p in own]
    for g, p in zip(got, own):
        assert g["probabilities"] == pytest.approx(p.probabilities, abs=1e-4)


def test_one_task_merged_alone_takes_the_tables_and_predicts_as_its_source(tiny_build, tiny_bert, tmp_path):
    """A task store's entry: one task whose graphs take task ids and the tables, used like a one-task bundle
    (no --task, shown as its task), its rows what its source bundle gives."""
    source = tiny_build[0] / "toy-soft"
    build(["merge", f"reviews={source}", "--backbone", str(tiny_bert), "--out", str(tmp_path / "reviews")])
    m = json.loads((tmp_path / "reviews" / "manifest.json").read_text())
    assert m["task_tables"] is True and [t["name"] for t in m["tasks"]] == ["reviews"]
    assert "task_ids" in m["signature"]["inputs"] and m["export"]["sources"] <= 1e-4
    graph = onnx.load(str(tmp_path / "reviews" / "model.onnx"), load_external_data=False)
    assert "task_ids" in {i.name for i in graph.graph.input}
    merged, own = Bundle.load(tmp_path / "reviews"), Bundle.load(source)
    np.testing.assert_allclose(merged.logits(TEXTS, batch_size=2), own.logits(TEXTS), atol=1e-4)
    for backend in ("onnxruntime", "mindspore"):
        np.testing.assert_allclose(Bundle.load(tmp_path / "reviews", backend=backend).logits(TEXTS),
                                   own.logits(TEXTS), atol=1e-4, err_msg=backend)
    result = CliRunner().invoke(run_cli, ["predict", "--bundle", str(tmp_path / "reviews"), "--format", "jsonl", "-"],
                                input="\n".join(TEXTS) + "\n")
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [g["label"] for g in got] == [p.label for p in own.predict(TEXTS)] and "task" not in got[0]
    info = CliRunner().invoke(run_cli, ["info", str(tmp_path / "reviews")])
    assert info.exit_code == 0 and "soft prompt bundle for reviews" in info.output.splitlines()[0]


def test_peft_adapters_merge_beside_bundles(merged_bundle, tiny_bert, tmp_path):
    """A PEFT adapter directory is a merge source as `pt-build import` would fold it: here the prefix bundle's own
    adapter (FEATURE_EXTRACTION, its mean head beside it) and the pairs bundle's (SEQ_CLS, cls pooling)."""
    sources = merged_bundle[1]
    out = tmp_path / "with-adapters"
    build(["merge", f"own={sources['prefix'] / 'peft'}", f"cls={sources['pairs'] / 'peft'}",
           f"late={sources['late']}", "--out", str(out), "--backbone", str(tiny_bert)])
    merged = Bundle.load(out)
    assert merged.task_names == ["own", "cls", "late"]
    own = merged.manifest.tasks[0]
    assert own.labels == ("LABEL_0", "LABEL_1") and own.recipe["source"] == "peft" and own.prompt_method == "prefix-tuning"
    rows = [("own", t) for t in TEXTS] + [("late", t) for t in TEXTS] + [("cls", t) for t in TEXTS]
    got = merged.logits([t for _, t in rows], task=[n for n, _ in rows], batch_size=7)
    want = np.concatenate([Bundle.load(sources["prefix"]).logits(TEXTS), Bundle.load(sources["late"]).logits(TEXTS)])
    np.testing.assert_allclose(got[: 2 * len(TEXTS), :2], want, atol=1e-4)
    # The cls adapter against the bundle `pt-build import` folds of it (one-text inputs, as merged).
    build(["import", str(sources["pairs"] / "peft"), "--backbone", str(tiny_bert), "--out", str(tmp_path),
           "--name", "imported"])
    np.testing.assert_allclose(got[2 * len(TEXTS):], Bundle.load(tmp_path / "imported").logits(TEXTS), atol=1e-4)
    assert json.loads((out / "manifest.json").read_text())["export"]["sources"] <= 1e-4


def test_add_joins_a_merged_bundle_and_leaves_its_tasks_unchanged_to_the_bit(merged_bundle, tiny_bert, tmp_path):
    sources = merged_bundle[1]
    base = tmp_path / "base"
    build(["merge", f"zeroshot={sources['zeroshot']}", f"prefix={sources['prefix']}", f"late={sources['late']}",
           "--out", str(base), "--backbone", str(tiny_bert)])
    before = {name: Bundle.load(base).logits(TEXTS, task=name) for name in ("zeroshot", "prefix", "late")}
    files = json.loads((base / "manifest.json").read_text())["files"]
    result = build(["merge", "--add", str(base), f"prefix1={sources['prefix1']}", f"probe={sources['probe']}",
                    "--backbone", str(tiny_bert)])
    assert "2 added to" in result.output and "grow" not in result.output
    grown = Bundle.load(base)
    assert grown.task_names == ["zeroshot", "prefix", "late", "prefix1", "probe"]
    for name, logits in before.items():
        assert np.array_equal(grown.logits(TEXTS, task=name), logits), name  # to the bit
    for name in ("prefix1", "probe"):
        np.testing.assert_allclose(grown.logits(TEXTS, task=name), Bundle.load(sources[name]).logits(TEXTS),
                                   atol=1e-4)
    assert json.loads((base / "manifest.json").read_text())["files"]["prompt.safetensors"] != files["prompt.safetensors"]
    # A task that needs longer tables than the bundle has: added, and the log says the others may move.
    result = build(["merge", "--add", str(base), f"shallow={sources['sentiment']}", "--backbone", str(tiny_bert)])
    assert "grow" in result.output
    again = Bundle.load(base)
    np.testing.assert_allclose(again.logits(TEXTS, task="prefix"), before["prefix"], atol=1e-5)
    # --add takes a bundle; a task already there is refused, and the bundle stays as it was.
    assert "appears twice" in merge_error(["--add", base, f"late={sources['late']}", "--backbone", tiny_bert])
    assert "a one-task bundle, not a merged one" in merge_error(["--add", sources["late"], f"x={sources['probe']}",
                                                                "--backbone", tiny_bert])
    assert Bundle.load(base).task_names == ["zeroshot", "prefix", "late", "prefix1", "probe", "shallow"]


def test_int8_merge_from_the_ranges_each_source_records(merged_bundle, tiny_bert, tmp_path):
    """Sources built with --quantize int8 record their calibration ranges (task details, and beside their PEFT
    adapter); a merge makes an int8 graph from them with no training data, and each task's int8 rows stay close
    to its own int8 bundle's (the scales are joined over the tasks, so only close, not equal)."""
    sources = merged_bundle[1]
    recorded = Bundle.load(sources["prefix"]).manifest.only.details["int8_ranges"]
    assert "layers.0.attention" in recorded and all(lo <= hi for lo, hi in recorded.values())
    assert json.loads((sources["prefix"] / "peft" / "ptbundle_calibration.json").read_text()) == recorded
    out = tmp_path / "int8"
    build(["merge", f"prefix={sources['prefix']}", f"adapter={sources['prefix'] / 'peft'}", "--quantize", "int8",
           "--out", str(out), "--backbone", str(tiny_bert)])
    merged = Bundle.load(out, int8=True)
    own = Bundle.load(sources["prefix"], int8=True)
    fp32 = Bundle.load(sources["prefix"]).logits(TEXTS)
    for name in ("prefix", "adapter"):
        got = merged.logits(TEXTS, task=name)
        # The same ranges give the same scales; the two graphs' fp32 activations may still differ in the last bits
        # on another CPU's kernels and round to a neighbouring int8 step, hence not equality.
        np.testing.assert_allclose(got, own.logits(TEXTS), atol=1e-2)
        assert np.abs(got - fp32).max() > 1e-5  # it is the int8 graph that answered
    assert all("int8" not in t.metrics for t in merged.manifest.tasks)  # its sources' int8 figures are not its own
    int8_graph = onnx.load(str(out / "model.int8.onnx"))  # takes the tables like model.onnx, holds none of them
    assert not [t.name for t in int8_graph.graph.initializer if t.name.startswith("task.")]
    assert "task.past.0" in {i.name for i in int8_graph.graph.input}
    # A source without ranges is refused by name, and nothing is written.
    assert "records no int8 calibration ranges" in merge_error([f"prefix={sources['prefix']}", sources["late"],
                                                               "--quantize", "int8", "--out", tmp_path / "no",
                                                               "--backbone", tiny_bert])
    assert not (tmp_path / "no").exists()


def test_int8_merge_refuses_malformed_calibration_beside_an_adapter(merged_bundle, tiny_bert, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(merged_bundle[1]["prefix"] / "peft", adapter)
    (adapter / "ptbundle_calibration.json").write_text(json.dumps({"layers.0.attention": [3.0, "x"]}))
    error = merge_error([f"a={adapter}", f"prefix={merged_bundle[1]['prefix']}", "--quantize", "int8",
                         "--out", tmp_path / "m", "--backbone", tiny_bert])
    assert f"{adapter}: task 'a': its int8 calibration ranges are not" in error and not (tmp_path / "m").exists()


def test_a_task_that_does_not_fit_the_tables_is_refused_naming_its_bundle(merged_bundle, tiny_bert, tmp_path):
    """A prompt.safetensors whose head has the wrong width (its hash re-sealed, so only the shapes are wrong)."""
    from safetensors.numpy import load_file, save_file
    from ptbundle.runtime.format import sha256_file

    bad = tmp_path / "bad"
    shutil.copytree(merged_bundle[1]["probe"], bad)
    state = load_file(str(bad / "prompt.safetensors"))
    state["classifier.weight"] = state["classifier.weight"][:, :-1]
    save_file(state, str(bad / "prompt.safetensors"))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["prompt.safetensors"] = sha256_file(bad / "prompt.safetensors")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    error = merge_error([f"bad={bad}", merged_bundle[1]["prefix"], "--out", tmp_path / "m", "--backbone", tiny_bert])
    assert f"{bad}: prompt.safetensors: task bad: classifier.weight" in error and not (tmp_path / "m").exists()


def test_damaged_task_tables_are_one_line_errors(merged_bundle, tmp_path):
    """The tables feed every graph: a changed file fails its hash, and one read unchecked fails by name, never as
    a traceback from deep inside onnxruntime."""
    from ptbundle.runtime.errors import BundleError

    damaged = tmp_path / "damaged"
    shutil.copytree(merged_bundle[0], damaged)
    tables = damaged / "prompt.safetensors"
    tables.write_bytes(tables.read_bytes()[:-100])
    with pytest.raises(BundleError, match="prompt.safetensors.*sha256"):
        Bundle.load(damaged)
    with pytest.raises(BundleError, match="prompt.safetensors: cannot read the task tables"):
        Bundle.load(damaged, verify=False)
