"""pt-run serve --task-store: the V2 model repository extension (index, load, unload), driven by tritonclient's HTTP
client against a real server process."""

import os
import shutil
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http")  # the test extra
from tritonclient.utils import InferenceServerException  # noqa: E402

from helpers import assert_one_error_line, write_chat_bundle  # noqa: E402
from serving import PT_RUN, Server, metric_samples  # noqa: E402
from ptbundle.runtime import Bundle  # noqa: E402

TEXTS = ["a great movie", "the worst film ever", "boring acting and a weak story but the best script"]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def store(tmp_path, tiny_build):
    d = tmp_path / "store"
    d.mkdir()
    for name in ("toy-soft", "toy-hard-probe"):
        shutil.copytree(tiny_build[0] / name, d / name)
    return d


@contextmanager
def serving(*args, wait_ms=5):
    """A real `pt-run serve` process and tritonclient's HTTP client to it, both closed at the end."""
    server = Server(*args, "--max-wait-ms", str(wait_ms))
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60)
    try:
        yield server, client
    finally:
        client.close()
        server.stop()


def texts_input(texts):
    tensor = tritonhttp.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object))
    return tensor


def refused(call, status, match):
    with pytest.raises(InferenceServerException, match=match) as e:
        call()
    assert e.value.status() == str(status), e.value


def test_load_unload_round_trip(store):
    with serving("--task-store", store, "--repository-token", TOKEN) as (server, client):
        index = client.get_model_repository_index(headers=AUTH)
        assert index == [{"name": "toy-hard-probe", "state": "READY"}, {"name": "toy-soft", "state": "READY"}]
        client.unload_model("toy-soft", headers=AUTH)
        refused(lambda: client.infer("toy-soft", [texts_input(TEXTS)]), 404, "'toy-soft' is unloaded")
        assert server.predict("toy-soft", TEXTS)[0] == 404
        assert not client.is_model_ready("toy-soft") and client.is_model_ready("toy-hard-probe")
        assert {"name": "toy-soft", "state": "UNAVAILABLE", "reason": "unloaded"} in \
            client.get_model_repository_index(headers=AUTH)
        client.load_model("toy-soft", headers=AUTH)
        assert client.is_model_ready("toy-soft")
        for model in ("toy-soft", "toy-hard-probe"):
            result = client.infer(model, [texts_input(TEXTS)])
            want = Bundle.load(store / model).predict(TEXTS)
            labels = list(want[0].probabilities)
            assert result.as_numpy("probabilities") == pytest.approx(
                np.array([[w.probabilities[l] for l in labels] for w in want]), abs=1e-5)
            assert [x.decode() for x in result.as_numpy("label")] == [w.label for w in want]
        assert "model_repository" in client.get_server_metadata()["extensions"]


def test_unload_answers_the_requests_in_flight(store):
    # a batch waits 600 ms for more texts: requests sent just before the unload are still queued when it comes
    with serving("--task-store", store, wait_ms=600) as (server, client):
        answers = []

        def send():
            c = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60)
            answers.append(c.infer("toy-soft", [texts_input(TEXTS)]).as_numpy("label").shape)
            c.close()

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        client.unload_model("toy-soft")  # no token configured: none needed
        assert not answers  # still queued
        refused(lambda: client.infer("toy-soft", [texts_input(TEXTS)]), 404, "'toy-soft' is unloaded")
        for t in threads:
            t.join(30)
        assert answers == [(3,)] * 4
        assert client.infer("toy-hard-probe", [texts_input(TEXTS)]).as_numpy("label").shape == (3,)


def test_token_names_and_changed_files_refused(store, tiny_bundle, tmp_path):
    os.symlink(tiny_bundle, store / "outside")  # a bundle, but outside the store
    shutil.copytree(tiny_bundle, store / "toy-soft-copy")
    with serving("--task-store", store, "--repository-token", TOKEN) as (server, client):
        assert [r["name"] for r in client.get_model_repository_index(headers=AUTH)] == \
            ["toy-hard-probe", "toy-soft", "toy-soft-copy"]
        refused(lambda: client.get_model_repository_index(), 401, "Bearer")
        refused(lambda: client.unload_model("toy-soft", headers={"Authorization": "Bearer wrong"}), 401, "Bearer")
        refused(lambda: client.load_model("toy-soft"), 401, "Bearer")
        refused(lambda: client.load_model("..", headers=AUTH), 400, r"'\.\.' is not a plain name")
        refused(lambda: client.load_model("outside", headers=AUTH), 400, "'outside' leads out of the task store")
        refused(lambda: client.load_model("toy-soft/../toy-soft", headers=AUTH), 400, "not a plain name")
        refused(lambda: client.load_model("nope", headers=AUTH), 404, "no bundle 'nope'")
        # a changed file: the reload is refused naming it, the loaded copy and the others keep serving
        graph = store / "toy-soft-copy" / "model.onnx"
        graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
        refused(lambda: client.load_model("toy-soft-copy", headers=AUTH), 400, "toy-soft-copy/model.onnx: sha256")
        for model in ("toy-soft", "toy-soft-copy", "toy-hard-probe"):
            assert client.infer(model, [texts_input(TEXTS)]).as_numpy("label").shape == (3,)
        row = [r for r in client.get_model_repository_index(headers=AUTH) if r["name"] == "toy-soft-copy"][0]
        assert row["state"] == "READY"
        client.unload_model("toy-soft-copy", headers=AUTH)
        refused(lambda: client.load_model("toy-soft-copy", headers=AUTH), 400, "model.onnx: sha256")
        row = [r for r in client.get_model_repository_index(headers=AUTH) if r["name"] == "toy-soft-copy"][0]
        assert row["state"] == "UNAVAILABLE" and "model.onnx: sha256" in row["reason"]
        assert client.is_model_ready("toy-soft") and client.is_model_ready("toy-hard-probe")


def test_repository_absent_without_a_store(tiny_bundle):
    with serving(tiny_bundle) as (server, client):
        refused(lambda: client.get_model_repository_index(), 404, "--task-store")
        refused(lambda: client.load_model("toy-soft"), 404, "--task-store")
        refused(lambda: client.unload_model("toy-soft"), 404, "--task-store")
        assert "model_repository" not in client.get_server_metadata()["extensions"]
        assert client.is_model_ready("toy-soft")


def test_on_demand_loading_within_a_bound_unloads_the_least_recently_used(store, tiny_build):
    """--load-on-demand --max-loaded 2 over three entries: nothing loaded at start, a request loads what it names,
    the third unloads the least recently used, which a later request loads again; every answer is its own."""
    shutil.copytree(tiny_build[0] / "toy-hard-zeroshot", store / "toy-hard-zeroshot")
    want = {name: [p.label for p in Bundle.load(store / name).predict(TEXTS)] for name in os.listdir(store)}
    flags = ("--repository-token", TOKEN, "--load-on-demand", "--max-loaded", "2")
    with serving("--task-store", store, *flags) as (server, client):
        index = client.get_model_repository_index(headers=AUTH)
        assert [row["state"] for row in index] == ["UNAVAILABLE"] * 3  # nothing loaded until asked for
        for name in ("toy-soft", "toy-hard-probe", "toy-soft", "toy-hard-zeroshot"):  # toy-hard-probe is coldest
            status, body = server.predict(name, TEXTS)
            assert status == 200 and [p["label"] for p in body["predictions"]] == want[name], (name, body)
        ready = {row["name"]: row for row in client.get_model_repository_index(headers=AUTH)}
        assert {n for n, row in ready.items() if row["state"] == "READY"} == {"toy-soft", "toy-hard-zeroshot"}
        assert "least recently used" in ready["toy-hard-probe"]["reason"]
        result = client.infer("toy-hard-probe", [texts_input(TEXTS)])  # V2 loads on demand too
        assert [x.decode() for x in result.as_numpy("label")] == want["toy-hard-probe"]
        assert server.predict("nobody", TEXTS)[0] == 404  # not an entry: nothing to load
        # an explicit load within the bound makes room the same way
        client.load_model("toy-soft", headers=AUTH)
        loaded = [row["name"] for row in client.get_model_repository_index(headers=AUTH) if row["state"] == "READY"]
        assert len(loaded) == 2 and "toy-soft" in loaded
        metrics = server.request("GET", "/metrics")[1]
        assert "ptbundle_store_evictions_total 3.0" in metrics and "ptbundle_store_loads_total" in metrics


@pytest.mark.parametrize("flags", [["--load-on-demand"], ["--max-loaded", "2"]])
def test_store_flags_without_a_store_are_one_line(tiny_bundle, flags):
    done = subprocess.run([PT_RUN, "serve", str(tiny_bundle), "--port", "0", *flags], capture_output=True, text=True,
                          timeout=120)
    assert_one_error_line(done.returncode, done.stderr, f"{flags[0]} is about the task store: give --task-store DIR")



@pytest.fixture(scope="module")
def table_entries(tmp_path_factory, tiny_build, tiny_bert):
    """One-task merged bundles (their graphs take the task tables): two PEFT prefix adapters folded on the same
    backbone (the same graph file), the toy prefix task (a longer prefix: another graph)."""
    from conftest import build

    from ptbundle.builder.models.device import use_device

    use_device("CPU")
    d = tmp_path_factory.mktemp("tables")
    adapters = Path(__file__).parents[1] / "fixtures" / "peft_adapters"
    for name, source in (("p1", adapters / "bert-prefix"), ("p2", adapters / "bert-prefix-projection"),
                         ("toy", tiny_build[0] / "toy-soft")):
        build(["merge", f"{name}={source}", "--out", str(d / name), "--backbone", str(tiny_bert)])
    return d


def test_entries_on_one_graph_share_it_and_its_batches(tmp_path, table_entries, tiny_build):
    """Entries whose graphs are the same file run on one graph: one batcher, rows of one table; each answers as
    its own bundle does, through unloads, reloads (rows reused) and a load that grows the table."""
    store = tmp_path / "store"
    store.mkdir()
    for name in ("p1", "p2", "toy"):
        shutil.copytree(table_entries / name, store / name)
    shutil.copytree(tiny_build[0] / "toy-hard-probe", store / "probe")
    want = {name: Bundle.load(store / name).logits(TEXTS) for name in ("p1", "p2", "toy", "probe")}
    assert not np.allclose(want["p1"], want["p2"], atol=1e-3)  # two tasks, not one twice
    with serving("--task-store", store, wait_ms=300) as (server, client):

        def check(names):
            answers = {}

            def send(name):
                c = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60)
                answers[name] = c.infer(name, [texts_input(TEXTS)]).as_numpy("probabilities")
                c.close()

            threads = [threading.Thread(target=send, args=(n,)) for n in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            for name in names:  # sent together: p1's and p2's rows ran in one batch of the shared graph
                expected = np.exp(want[name]) / np.exp(want[name]).sum(-1, keepdims=True)
                assert answers[name] == pytest.approx(expected, abs=1e-5), name

        def graphs():
            return metric_samples(server.request("GET", "/metrics")[1])[("ptbundle_store_graphs", ())]

        assert graphs() == 3  # p1 and p2 share one; toy and probe run their own
        check(["p1", "p2", "toy", "probe"])
        batches = metric_samples(server.request("GET", "/metrics")[1])
        assert batches[("ptbundle_batch_size_count", ())] == 3  # p1 and p2 in one batch
        client.unload_model("p1")
        refused(lambda: client.infer("p1", [texts_input(TEXTS)]), 404, "'p1' is unloaded")
        check(["p2"])
        shutil.copytree(store / "p1", store / "p3")  # a third entry on the graph takes p1's old row,
        client.load_model("p3")
        client.load_model("p1")  # and p1 again grows the table
        assert graphs() == 3
        want["p3"] = want["p1"]
        check(["p1", "p2", "p3"])
        for name in ("p1", "p2", "p3"):
            client.unload_model(name)
        assert graphs() == 2  # the shared graph closed with its last entry
        client.load_model("p2")
        check(["p2", "toy"])


def test_a_changed_table_file_is_refused_when_joining_a_shared_graph(tmp_path, table_entries):
    store = tmp_path / "store"
    store.mkdir()
    for name in ("p1", "p2"):
        shutil.copytree(table_entries / name, store / name)
    with serving("--task-store", store, "--load-on-demand") as (server, client):
        client.load_model("p1")
        tables = store / "p2" / "prompt.safetensors"
        tables.write_bytes(tables.read_bytes()[:-1] + b"\1")
        refused(lambda: client.load_model("p2"), 400, "p2/prompt.safetensors: sha256")
        assert client.infer("p1", [texts_input(TEXTS)]).as_numpy("label").shape == (3,)


def test_an_entry_joining_an_open_graph_checks_the_tokenizer_only_where_it_reads_its_own(tmp_path, table_entries):
    """An entry on an open graph runs on that graph's tokenizer (the same sha256 in both manifests): its own
    tokenizer.json is not read, so a change to it does not matter and its answers are the graph's.  An entry whose
    task has a max_length the graph has no tokenizer for reads its own file, which is checked: a change is a 400."""
    import json

    store = tmp_path / "store"
    store.mkdir()
    for name in ("p1", "p2"):  # p2 keeps the graph open
        shutil.copytree(table_entries / name, store / name)
    want = Bundle.load(store / "p1").logits(TEXTS)
    shutil.copytree(store / "p1", store / "unread")
    shutil.copytree(store / "p1", store / "longer")
    for name in ("unread", "longer"):
        tokenizer = store / name / "tokenizer.json"
        tokenizer.write_text(tokenizer.read_text() + " ")  # still a tokenizer, no longer the recorded one
    manifest = json.loads((store / "longer" / "manifest.json").read_text())
    manifest["tasks"][0]["max_length"] += 1
    (store / "longer" / "manifest.json").write_text(json.dumps(manifest))
    with serving("--task-store", store, "--load-on-demand") as (server, client):
        for name in ("p2", "p1"):
            client.load_model(name)
        client.unload_model("p1")  # its task name is free again; the graph stays open for p2
        client.load_model("unread")
        result = client.infer("p1", [texts_input(TEXTS)]).as_numpy("probabilities")  # the task's name inside
        assert result == pytest.approx(np.exp(want) / np.exp(want).sum(-1, keepdims=True), abs=1e-5)
        client.unload_model("unread")
        refused(lambda: client.load_model("longer"), 400, "longer/tokenizer.json: sha256")
        assert metric_samples(server.request("GET", "/metrics")[1])[("ptbundle_store_graphs", ())] == 1  # all on one


def test_an_entry_refused_for_a_name_clash_gives_its_rows_back(tmp_path, table_entries, tiny_bundle):
    """p1 is served from the command line too: the store's p1 is refused (409 at start, listed with the reason),
    the rows it was given are freed, and p2 on the same graph answers as its own bundle."""
    store = tmp_path / "store"
    store.mkdir()
    for name in ("p1", "p2"):
        shutil.copytree(table_entries / name, store / name)
    with serving(f"p1={tiny_bundle}", "--task-store", store) as (server, client):
        row = [r for r in client.get_model_repository_index() if r["name"] == "p1"][0]
        assert row["state"] == "UNAVAILABLE" and "already served" in row["reason"]
        refused(lambda: client.load_model("p1"), 409, "already served")
        got = client.infer("p2", [texts_input(TEXTS)]).as_numpy("probabilities")
        want = Bundle.load(store / "p2").logits(TEXTS)
        assert got == pytest.approx(np.exp(want) / np.exp(want).sum(-1, keepdims=True), abs=1e-5)
        assert [x.decode() for x in client.infer("p1", [texts_input(TEXTS)]).as_numpy("label")] == \
            [p.label for p in Bundle.load(tiny_bundle).predict(TEXTS)]  # the command line's p1
        assert metric_samples(server.request("GET", "/metrics")[1])[("ptbundle_store_graphs", ())] == 1


def test_a_load_that_fails_within_the_bound_unloads_nothing(store, tmp_path):
    """--max-loaded 2 with both slots taken: a load refused at install (a generation bundle) leaves the two loaded
    entries serving; a load that succeeds then unloads the least recently used."""
    shutil.copytree(write_chat_bundle(tmp_path / "built"), store / "chat")
    shutil.copytree(store / "toy-soft", store / "toy-soft-2")
    with serving("--task-store", store, "--load-on-demand", "--max-loaded", "2") as (server, client):
        for name in ("toy-soft", "toy-hard-probe"):
            assert server.predict(name, TEXTS)[0] == 200
        refused(lambda: client.load_model("chat"), 400, "chat: not loaded: .*a generation bundle")
        ready = {r["name"] for r in client.get_model_repository_index() if r["state"] == "READY"}
        assert ready == {"toy-soft", "toy-hard-probe"}
        evictions = ("ptbundle_store_evictions_total", ())
        assert metric_samples(server.request("GET", "/metrics")[1])[evictions] == 0
        client.load_model("toy-soft-2")  # the coldest, toy-soft, makes room
        ready = {r["name"] for r in client.get_model_repository_index() if r["state"] == "READY"}
        assert ready == {"toy-hard-probe", "toy-soft-2"}
        assert metric_samples(server.request("GET", "/metrics")[1])[evictions] == 1


def test_a_generation_bundle_in_the_store_is_refused_by_name_and_the_others_serve(store, tmp_path):
    shutil.copytree(write_chat_bundle(tmp_path / "built"), store / "chat")
    with serving("--task-store", store) as (server, client):
        row = [r for r in client.get_model_repository_index() if r["name"] == "chat"][0]
        assert row["state"] == "UNAVAILABLE" and "a generation bundle: pt-run serve serves classifiers" in row["reason"]
        refused(lambda: client.load_model("chat"), 400, "chat: not loaded: .*a generation bundle")
        assert client.infer("toy-soft", [texts_input(TEXTS)]).as_numpy("label").shape == (3,)


ADAPTERS = Path(__file__).parents[1] / "fixtures" / "peft_adapters"


def adapter_entry(store, name, source, base_model):
    """A PEFT adapter directory as an entry of the store, naming `base_model` as PEFT records a hub id."""
    import json

    shutil.copytree(source, store / name)
    config = json.loads((store / name / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_model
    (store / name / "adapter_config.json").write_text(json.dumps(config))


def softmax(logits):
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def test_a_peft_adapter_loads_onto_the_open_graph_of_its_backbone(tmp_path, table_entries):
    """A SEQ_CLS prefix adapter on BERT (its head reads the checkpoint's pooler, which the merged entry records)
    becomes a row of p1's graph and answers as `pt-build merge` of it (p2) does, sharing p1's batches; it keeps the
    graph open when p1 goes.  Adapters the graph has no room for, or on another backbone, are 400s naming the file,
    and the others keep serving."""
    from ptbundle.runtime.format import Manifest

    store = tmp_path / "store"
    store.mkdir()
    shutil.copytree(table_entries / "p1", store / "p1")
    backbone = Manifest.read(store / "p1").backbone.name
    adapter_entry(store, "adapter", ADAPTERS / "bert-prefix-projection", f"someone/{backbone}")
    adapter_entry(store, "shallow", ADAPTERS / "bert-prompt-tuning", f"someone/{backbone}")  # needs prompt slots
    adapter_entry(store, "other", ADAPTERS / "bert-prefix", "bert-base-uncased")
    want = Bundle.load(table_entries / "p2").logits(TEXTS)  # the same adapter, merged
    with serving("--task-store", store, wait_ms=300) as (server, client):
        states = {r["name"]: r for r in client.get_model_repository_index()}
        assert states["p1"]["state"] == states["adapter"]["state"] == "READY"  # bundles load first
        assert "its 3 virtual tokens do not fit the graph's 0 prompt slots" in states["shallow"]["reason"]
        assert "'bert-base-uncased': no loaded entry runs a merged graph of that backbone" in states["other"]["reason"]
        assert metric_samples(server.request("GET", "/metrics")[1])[("ptbundle_store_graphs", ())] == 1
        answers = {}

        def send(name):
            c = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60)
            answers[name] = c.infer(name, [texts_input(TEXTS)])
            c.close()

        threads = [threading.Thread(target=send, args=(n,)) for n in ("p1", "adapter")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answers["adapter"].as_numpy("probabilities") == pytest.approx(softmax(want), abs=1e-5)
        assert {x.decode() for x in answers["adapter"].as_numpy("label")} <= {"LABEL_0", "LABEL_1"}
        assert metric_samples(server.request("GET", "/metrics")[1])[("ptbundle_batch_size_count", ())] == 1
        refused(lambda: client.load_model("shallow"), 400, "shallow: not loaded: shallow: its 3 virtual tokens")
        client.unload_model("p1")
        got = client.infer("adapter", [texts_input(TEXTS)]).as_numpy("probabilities")
        assert got == pytest.approx(softmax(want), abs=1e-5)


def test_a_mean_pooled_adapter_reads_its_own_head_and_needs_an_open_graph(tmp_path, tiny_bert):
    """The default bundle's kind: a FEATURE_EXTRACTION prefix with head.safetensors beside it.  On demand, it is
    refused until a merged entry on its backbone is loaded; then it runs on that graph with its own head (a bias
    moved by +1 and -1 moves the logits by exactly that from the merged entry's)."""
    from conftest import build
    from safetensors.numpy import load_file, save_file

    from ptbundle.runtime.format import Manifest

    store = tmp_path / "store"
    store.mkdir()
    build(["merge", f"mean={ADAPTERS / 'bert-prefix-mean'}", "--out", str(store / "mean"), "--backbone",
           str(tiny_bert)])
    adapter_entry(store, "moved", ADAPTERS / "bert-prefix-mean", Manifest.read(store / "mean").backbone.name)
    head = load_file(str(store / "moved" / "head.safetensors"))
    save_file({**head, "bias": head["bias"] + np.array([1.0, -1.0], np.float32)}, str(store / "moved" /
                                                                                       "head.safetensors"))
    want = Bundle.load(store / "mean").logits(TEXTS) + np.array([1.0, -1.0])
    with serving("--task-store", store, "--load-on-demand") as (server, client):
        refused(lambda: client.infer("moved", [texts_input(TEXTS)]), 400,
                "moved/adapter_config.json: base_model_name_or_path .* no loaded entry .*loaded: none")
        assert server.predict("mean", TEXTS)[0] == 200
        got = client.infer("moved", [texts_input(TEXTS)]).as_numpy("probabilities")
        assert got == pytest.approx(softmax(want), abs=1e-5)


def test_an_adapter_on_an_int8_graph_needs_its_ranges_inside_the_graphs_scales(tmp_path, tiny_build, tiny_bert):
    """pt-run serve --int8: an adapter runs with the merged int8 graph's scales, made for the graph's own tasks, so
    it loads only when its recorded activation ranges (a bundle's peft/ holds them) fall inside them."""
    import json

    from conftest import build

    from ptbundle.runtime.format import Manifest

    store = tmp_path / "store"
    store.mkdir()
    source = tiny_build[0] / "toy-soft"
    build(["merge", f"toy={source}", "--quantize", "int8", "--out", str(store / "toy"), "--backbone",
           str(tiny_bert)])
    name = Manifest.read(store / "toy").backbone.name
    for entry in ("same", "wider", "bare"):
        adapter_entry(store, entry, source / "peft", name)
    ranges_file = store / "wider" / "ptbundle_calibration.json"
    ranges = json.loads(ranges_file.read_text())
    role = sorted(ranges)[0]
    ranges[role][1] = 2 * abs(ranges[role][1]) + 1
    ranges_file.write_text(json.dumps(ranges))
    (store / "bare" / "ptbundle_calibration.json").unlink()
    want = Bundle.load(store / "toy", int8=True).logits(TEXTS)
    with serving("--task-store", store, "--int8") as (server, client):
        states = {r["name"]: r for r in client.get_model_repository_index()}
        assert states["toy"]["state"] == states["same"]["state"] == "READY"
        assert f"wider/ptbundle_calibration.json: {role} ranges over" in states["wider"]["reason"]
        assert "outside the open int8 graph's scales" in states["wider"]["reason"]
        assert "bare: no ptbundle_calibration.json" in states["bare"]["reason"]
        got = client.infer("same", [texts_input(TEXTS)]).as_numpy("probabilities")
        assert got == pytest.approx(softmax(want), abs=1e-5)


def test_files_of_an_entry_that_lead_out_of_the_store_are_refused(tmp_path, table_entries, tiny_bundle):
    """The server reads only the store: a bundle whose tokenizer.json is a link to an identical file outside it (its
    sha256 would pass), and an adapter whose weights are a link out, are 400s naming the file; the rest serve."""
    from ptbundle.runtime.format import Manifest

    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    shutil.copytree(table_entries / "p1", store / "p1")
    shutil.copytree(table_entries / "p2", store / "linked")
    shutil.move(store / "linked" / "tokenizer.json", outside / "tokenizer.json")
    os.symlink(outside / "tokenizer.json", store / "linked" / "tokenizer.json")
    adapter_entry(store, "adapter", ADAPTERS / "bert-prefix-projection", Manifest.read(store / "p1").backbone.name)
    shutil.move(store / "adapter" / "adapter_model.safetensors", outside / "adapter_model.safetensors")
    os.symlink(outside / "adapter_model.safetensors", store / "adapter" / "adapter_model.safetensors")
    with serving("--task-store", store) as (server, client):
        states = {r["name"]: r for r in client.get_model_repository_index()}
        assert states["p1"]["state"] == "READY"
        assert states["linked"]["reason"] == "linked/tokenizer.json leads out of the task store"
        assert states["adapter"]["reason"] == "adapter/adapter_model.safetensors leads out of the task store"
        refused(lambda: client.load_model("adapter"), 400, "adapter/adapter_model.safetensors leads out")
        assert client.infer("p1", [texts_input(TEXTS)]).as_numpy("label").shape == (3,)


def test_an_adapter_needing_more_positions_than_the_graph_was_checked_for_is_refused(tmp_path, tiny_bert):
    """An adapter runs at the max_length of the graph's first task.  Here that task has a 3-token prefix and 128 text
    tokens, and the graph's 10-token prefix slots belong to a task of 64: a 10-token adapter would need positions
    (138) no task on the graph was built for (131), and is refused; a 3-token one loads."""
    import json

    from conftest import build
    from safetensors.numpy import load_file, save_file

    from ptbundle.runtime.format import Manifest

    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir()
    store.mkdir()
    longer = work / "longer"
    shutil.copytree(ADAPTERS / "bert-prefix-mean", longer)
    prompt = load_file(str(longer / "adapter_model.safetensors"))["prompt_embeddings"]
    save_file({"prompt_embeddings": np.concatenate([prompt, prompt, prompt, prompt[:1]])},
              str(longer / "adapter_model.safetensors"))
    config = json.loads((longer / "adapter_config.json").read_text())
    (longer / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 10}))
    build(["merge", f"short={ADAPTERS / 'bert-prefix-mean'}", "--out", str(work / "short"), "--backbone",
           str(tiny_bert)])  # max_length 128
    build(["merge", str(work / "short"), f"long={longer}", "--max-length", "64", "--out", str(store / "both"),
           "--backbone", str(tiny_bert)])
    name = Manifest.read(store / "both").backbone.name
    adapter_entry(store, "fits", ADAPTERS / "bert-prefix-mean", name)
    adapter_entry(store, "too-long", longer, name)
    with serving("--task-store", store) as (server, client):
        states = {r["name"]: r for r in client.get_model_repository_index()}
        assert states["both"]["state"] == states["fits"]["state"] == "READY"
        assert "too-long: its 10 virtual tokens before 128 text tokens need more positions than any task on the" \
               " graph was checked for (131)" in states["too-long"]["reason"]
