"""pt-run serve: a real server process on the loopback address, answered by a real HTTP client (http.client)."""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import mixed_rows
from serving import PT_RUN, Server, metric_samples
from ptbundle.runtime import Bundle

@pytest.fixture()
def server(merged_bundle, tiny_bundle):
    s = Server(merged_bundle[0], f"single={tiny_bundle}", "--max-wait-ms", "20")
    yield s
    s.stop()


def instance(text, text_b):
    return text if text_b is None else {"text": text, "text_b": text_b}


def expected(merged_bundle, rows):
    bundle = Bundle.load(merged_bundle[0])
    return bundle.predict([r[1] for r in rows], [r[2] for r in rows], task=[r[0] for r in rows])


def test_endpoints(server, merged_bundle, tiny_bundle):
    assert server.request("GET", "/v2/health/live") == (200, {"live": True})
    assert server.request("GET", "/v2/health/ready") == (200, {"ready": True})
    assert server.request("GET", "/v1/models") == (200, {"models": [
        "sentiment", "zeroshot", "probe", "pairs", "prefix", "prefix1", "late", "single"]})
    status, meta = server.request("GET", "/v1/models/pairs")
    assert status == 200 and meta["pair"] is True and meta["labels"] == ["opposite", "other", "same"]
    rows = mixed_rows(12)
    want = expected(merged_bundle, rows)
    for (task, a, b), w in zip(rows, want):
        status, body = server.predict(task, [instance(a, b)])
        assert status == 200, body
        (got,) = body["predictions"]
        assert got["label"] == w.label
        assert got["probabilities"] == pytest.approx(w.probabilities, abs=1e-5)
    status, single = server.predict("single", ["a great movie", {"text": "the worst film ever"}])
    assert status == 200 and [p["label"] for p in single["predictions"]] == \
        [p.label for p in Bundle.load(tiny_bundle).predict(["a great movie", "the worst film ever"])]
    status, metrics = server.request("GET", "/metrics")
    samples = metric_samples(metrics)
    assert status == 200 and samples[("ptbundle_requests_total", (("code", "200"), ("task", "pairs")))] >= 1
    assert samples[("ptbundle_request_seconds_count", (("task", "pairs"),))] >= 1  # latency by task
    assert ("ptbundle_batch_size_bucket", (("le", "+Inf"),)) in samples


def batch_sizes(metrics: str) -> tuple:
    samples = metric_samples(metrics)
    return samples[("ptbundle_batch_size_sum", ())], samples[("ptbundle_batch_size_count", ())]


def test_concurrent_clients_get_their_own_answers_in_shared_batches(server, merged_bundle):
    rows = mixed_rows(160, seed=3)
    want = expected(merged_bundle, rows)
    answers, errors = [None] * len(rows), []

    def client(k):
        for i in range(k, len(rows), 8):
            task, a, b = rows[i]
            status, body = server.predict(task, [instance(a, b)])
            if status != 200:
                errors.append(body)
            else:
                answers[i] = body["predictions"][0]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, w in zip(answers, want):
        assert got["label"] == w.label and got["probabilities"] == pytest.approx(w.probabilities, abs=1e-5)
    total, count = batch_sizes(server.request("GET", "/metrics")[1])
    assert total == len(rows) and count < len(rows)  # some batches held several requests (of several tasks)


@pytest.mark.parametrize("method, path, payload, status, words", [
    ("POST", "/v1/models/sentiment:predict", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/models/nope:predict", b'{"instances": ["a"]}', 404, "no task 'nope'"),
    ("POST", "/v1/models/sentiment:predict", b'{"instances": [""]}', 422, "instances[0].text is empty"),
    ("POST", "/v1/models/sentiment:predict", b'{"instances": [3]}', 422, "instances[0] must be a string"),
    ("POST", "/v1/models/sentiment:predict", b'{"instances": "a"}', 422, "must be a list"),
    ("POST", "/v1/models/sentiment:predict", b'{"instances": []}', 422, "is empty"),
    ("POST", "/v1/models/sentiment:predict", b'{"texts": ["a"]}', 422, "unknown field(s) texts"),
    ("POST", "/v1/models/pairs:predict", b'{"instances": [{"text": "a"}]}', 422, "instances[0].text_b is missing"),
    ("POST", "/v1/models/sentiment:predict", json.dumps({"instances": ["a"] * 300}).encode(), 413, "at most 256"),
    ("POST", "/v1/models/sentiment:predict", json.dumps({"instances": ["a" * 30000]}).encode(), 413, "characters"),
    ("POST", "/v1/models/sentiment:predict", b'{"instances": ["' + b"a" * (2 << 20) + b'"]}', 413, "over"),
    ("GET", "/v1/models/sentiment:predict", None, 405, "takes POST"),
    ("GET", "/nowhere", None, 404, "no route"),
], ids=["json", "task", "empty", "type", "not-list", "none", "field", "pair", "many", "long", "body", "method",
        "route"])
def test_bad_requests_get_a_4xx_naming_the_problem(server, method, path, payload, status, words):
    got, body = server.request(method, path, raw=payload)
    assert got == status and words in body["error"], body
    assert server.predict("sentiment", ["a great movie"])[0] == 200  # and everyone else is still served


def test_clients_that_go_away_do_not_stop_the_server(server):
    for partial in (True, False):
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"instances": ["a great movie"] * 50}).encode()
        head = (f"POST /v1/models/sentiment:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + (body[:10] if partial else body))  # half a body, or a whole request never read
        sock.close()
    time.sleep(0.2)
    status, body = server.predict("sentiment", ["a great movie"])
    assert status == 200 and body["predictions"][0]["label"] in ("neg", "pos")


def test_sigterm_answers_the_requests_in_flight(merged_bundle):
    server = Server(merged_bundle[0], "--max-wait-ms", "1500")  # a request waits in the queue for 1.5 s
    result = {}

    def slow():
        result["answer"] = server.predict("sentiment", ["a great movie", "the worst film ever"])

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)  # while the request is queued
    thread.join(timeout=30)
    # uvicorn re-raises the signal once it has shut down, so the exit status says SIGTERM
    assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    status, body = result["answer"]
    want = Bundle.load(merged_bundle[0]).predict(["a great movie", "the worst film ever"], task="sentiment")
    assert status == 200 and [p["label"] for p in body["predictions"]] == [p.label for p in want]
    with pytest.raises(OSError):  # and nothing is listening any more
        socket.create_connection(("127.0.0.1", server.port), timeout=2)


def test_serve_start_errors_are_one_line(merged_bundle, tiny_bundle):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    runs = [([merged_bundle[0], "--port", port], "cannot listen there"),
            ([tiny_bundle, f"sentiment={tiny_bundle}", merged_bundle[0], "--port", "0"], "two bundles serve a task"),
            (["/nonexistent/bundle", "--port", "0"], "no such bundle directory")]
    try:
        for args, words in runs:
            done = subprocess.run([PT_RUN, "serve", *map(str, args)], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 1 and len(lines) == 1 and words in lines[0], done.stderr
    finally:
        taken.close()
