"""pt-run serve's Open Inference Protocol (V2): a real server process answered by tritonclient's HTTP client,
the protocol's reference client (written by others), and by http.client with the spec's JSON."""

import threading

import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http")  # the test extra
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import mixed_rows  # noqa: E402
from serving import Server, metric_samples  # noqa: E402
from ptbundle.runtime import Bundle  # noqa: E402

TEXTS = ["a great movie", "the worst film ever", "boring acting and a weak story but the best script"]


@pytest.fixture(scope="module")
def server(merged_bundle, tiny_bundle):
    s = Server(merged_bundle[0], f"single={tiny_bundle}", "--max-wait-ms", "20")
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    c = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=60)
    yield c
    c.close()


def texts_input(name, texts, binary):
    tensor = tritonhttp.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    return tensor


def v2_json(texts, texts_b=None, **extra):
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
    if texts_b is not None:
        inputs.append({"name": "text_b", "datatype": "BYTES", "shape": [len(texts_b)], "data": texts_b})
    return {"inputs": inputs, **extra}


def decoded(labels):
    return [x.decode() if isinstance(x, bytes) else x for x in labels]


def test_metadata_and_readiness(client, merged_bundle):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "ptbundle" and meta["version"] and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("sentiment") and client.is_model_ready("single")
    assert not client.is_model_ready("nope")
    pairs = client.get_model_metadata("pairs")
    assert pairs["name"] == "pairs" and pairs["platform"] == "onnxruntime_onnx"
    assert pairs["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                               {"name": "text_b", "datatype": "BYTES", "shape": [-1]}]
    assert pairs["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert [i["name"] for i in client.get_model_metadata("single")["inputs"]] == ["text"]
    with pytest.raises(InferenceServerException, match="no model 'nope'") as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_bundle_predict(client, tiny_bundle, merged_bundle, binary):
    for model, path in (("single", tiny_bundle), ("sentiment", merged_bundle[0])):
        result = client.infer(model, [texts_input("text", TEXTS, binary)])
        want = Bundle.load(path).predict(TEXTS, task=None if model == "single" else model)
        labels = list(want[0].probabilities)
        probabilities = result.as_numpy("probabilities")
        assert probabilities.dtype == np.float32 and probabilities.shape == (len(TEXTS), len(labels))
        assert probabilities == pytest.approx(np.array([[w.probabilities[l] for l in labels] for w in want]),
                                              abs=1e-5)
        assert decoded(result.as_numpy("label")) == [w.label for w in want]
        assert result.get_response()["model_name"] == model


def test_pair_task(client, merged_bundle):
    texts_b = ["the best film", "the worst script", "great"]
    result = client.infer("pairs", [texts_input("text", TEXTS, True), texts_input("text_b", texts_b, True)])
    want = Bundle.load(merged_bundle[0]).predict(TEXTS, texts_b, task="pairs")
    labels = ["opposite", "other", "same"]  # /v1/models/pairs' "labels": the probabilities' columns
    assert decoded(result.as_numpy("label")) == [w.label for w in want]
    assert result.as_numpy("probabilities") == pytest.approx(
        np.array([[w.probabilities[l] for l in labels] for w in want]), abs=1e-5)
    with pytest.raises(InferenceServerException, match="input 'text_b' is missing") as e:
        client.infer("pairs", [texts_input("text", TEXTS, True)])
    assert e.value.status() == "400"


def test_id_and_outputs_selection(client, server, tiny_bundle):
    result = client.infer("single", [texts_input("text", TEXTS, False)], request_id="req-7",
                          outputs=[tritonhttp.InferRequestedOutput("probabilities", binary_data=False)])
    response = result.get_response()
    assert response["id"] == "req-7" and [o["name"] for o in response["outputs"]] == ["probabilities"]
    assert result.as_numpy("label") is None
    # and in plain JSON, as curl would send it
    status, body = server.request("POST", "/v2/models/single/infer",
                                  v2_json(TEXTS[:2], id="x", outputs=[{"name": "label"}]))
    assert status == 200 and body["id"] == "x" and body["model_name"] == "single"
    (label,) = body["outputs"]
    assert label["name"] == "label" and label["datatype"] == "BYTES" and label["shape"] == [2]
    assert label["data"] == [p.label for p in Bundle.load(tiny_bundle).predict(TEXTS[:2])]
    status, body = server.request("POST", "/v2/models/single/infer", v2_json(TEXTS[:2]))
    assert "id" not in body and [o["name"] for o in body["outputs"]] == ["label", "probabilities"]
    assert body["outputs"][1]["shape"] == [2, 2] and len(body["outputs"][1]["data"]) == 4  # row-major, flat


@pytest.mark.parametrize("path, payload, status, words", [
    ("/v2/models/single/infer", {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
     400, "datatype 'FP32'; texts are BYTES"),
    ("/v2/models/single/infer", {"inputs": []}, 400, "\"inputs\" must be a non-empty list"),
    ("/v2/models/pairs/infer", v2_json(["a"]), 400, "input 'text_b' is missing"),
    ("/v2/models/single/infer", v2_json(["a great movie", " "]), 400, "input text[1] is empty"),
    ("/v2/models/single/infer", v2_json(["a", 3]), 400, "input text[1] must be a string"),
    ("/v2/models/single/infer", {"inputs": [{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
     400, "unknown input 'txt'"),
    ("/v2/models/single/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]},
     400, "shape [2] but 1 elements"),
    ("/v2/models/single/infer", v2_json(["a"], outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
    ("/v2/models/single/infer", v2_json(["a"] * 300), 413, "at most 256"),
    ("/v2/models/nope/infer", v2_json(["a"]), 404, "no model 'nope'"),
    ("/v2/models/nope/ready", None, 404, "no model 'nope'"),
], ids=["datatype", "no-inputs", "missing", "empty", "type", "name", "shape", "output", "many", "model", "ready"])
def test_bad_requests_get_one_line_4xx(server, path, payload, status, words):
    got, body = server.request("GET" if payload is None else "POST", path, payload)
    assert got == status and set(body) == {"error"} and words in body["error"], body
    assert "\n" not in body["error"]
    assert server.request("POST", "/v2/models/single/infer", v2_json(["a great movie"]))[0] == 200


def test_bad_binary_request_through_the_client(client):
    with pytest.raises(InferenceServerException, match="input text\\[0\\] is empty") as e:
        client.infer("single", [texts_input("text", [""], True)])
    assert e.value.status() == "400"
    with pytest.raises(InferenceServerException, match="datatype 'INT64'"):
        tensor = tritonhttp.InferInput("text", [1], "INT64")
        tensor.set_data_from_numpy(np.array([3], np.int64))
        client.infer("single", [tensor])


def batch_sizes(server) -> tuple:
    samples = metric_samples(server.request("GET", "/metrics")[1])
    return samples[("ptbundle_batch_size_sum", ())], samples[("ptbundle_batch_size_count", ())]


def test_v1_still_answers_and_shares_batches_with_v2(server, merged_bundle):
    before = batch_sizes(server)
    rows = mixed_rows(96, seed=5)
    want = Bundle.load(merged_bundle[0]).predict([r[1] for r in rows], [r[2] for r in rows],
                                                 task=[r[0] for r in rows])
    answers, errors = [None] * len(rows), []

    def ask(k):
        for i in range(k, len(rows), 8):
            task, a, b = rows[i]
            if i % 2:  # V1
                status, body = server.predict(task, [a if b is None else {"text": a, "text_b": b}])
                got = body["predictions"][0]["label"] if status == 200 else None
            else:  # V2
                status, body = server.request("POST", f"/v2/models/{task}/infer",
                                              v2_json([a], None if b is None else [b]))
                got = body["outputs"][0]["data"][0] if status == 200 else None
            if status != 200:
                errors.append(body)
            answers[i] = got

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and answers == [w.label for w in want]
    total, count = (a - b for a, b in zip(batch_sizes(server), before))
    assert total == len(rows) and count < len(rows)  # some batches held V1 and V2 requests (of several tasks)
    assert server.request("GET", "/v1/models")[1]["models"] == ["sentiment", "zeroshot", "probe", "pairs", "prefix", "prefix1", "late", "single"]
