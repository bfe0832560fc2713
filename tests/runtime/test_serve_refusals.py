"""pt-run serve refuses at start what it cannot serve, and no request makes it answer 500.

A real server process (tests/serving.py) on the real `tiny_bundle`, a real HTTP client sending raw bodies.
"""

import pytest

from helpers import assert_one_error_line, pt_run, write_chat_bundle
from serving import Server, metric_samples


@pytest.fixture(scope="module")
def server(tiny_bundle):
    s = Server(f"toy={tiny_bundle}")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_bundle(tmp_path_factory.mktemp("chat"))


@pytest.mark.parametrize("with_classifier", [False, True])
def test_a_generation_bundle_is_refused_at_start(chat, tiny_bundle, with_classifier):
    bundles = [tiny_bundle, chat] if with_classifier else [chat]
    code, err, _ = pt_run("serve", *bundles, "--port", 0)
    assert_one_error_line(code, err, f"{chat}: a generation bundle: pt-run serve serves classifiers",
                          "pt-run generate")
    assert "listening" not in err


@pytest.mark.parametrize("raw, expected", [
    (b'{"instances": ["ok \\ud83d"]}', "instances[0] holds a lone surrogate (U+D83D at character 4)"),
    (b'{"instances": [{"text": "fine", "x": "\\udc00"}]}', "instances[0].x holds a lone surrogate (U+DC00"),
    (b'{"instances": [{"text\\ud83d": "fine"}]}', "a key of instances[0] holds a lone surrogate (U+D83D"),
    (b'{"instances": ["ok \xed\xa0\xbd"]}', "instances[0] holds a lone surrogate (U+D83D at character 4)"),
], ids=["escape", "other-field", "key", "utf8-bytes"])
def test_a_lone_surrogate_is_400_naming_it(server, raw, expected):
    status, body = server.request("POST", "/v1/models/toy:predict", raw=raw)
    assert status == 400, body
    assert body["error"].startswith(f"request body is not valid Unicode: {expected}"), body


@pytest.mark.parametrize("raw", [
    b'{"instances": ' + b"[" * 50000 + b"]" * 50000 + b"}",
    b'{"instances": ["a"], "x": ' + b'{"a": ' * 50000 + b"1" + b"}" * 50000 + b"}",
], ids=["arrays", "objects"])
def test_a_deeply_nested_body_is_400(server, raw):
    status, body = server.request("POST", "/v1/models/toy:predict", raw=raw)
    assert status == 400, body
    assert body == {"error": "request body is nested too deeply (arrays or objects inside each other)"}


def test_the_server_keeps_serving_and_never_answered_500(server):
    for raw in (b'{"instances": ["ok \\ud83d"]}', b"[" * 50000):
        server.request("POST", "/v1/models/toy:predict", raw=raw)
    status, body = server.predict("toy", ["a great movie", "ok \U0001F600"])  # a surrogate pair is one character
    assert status == 200 and len(body["predictions"]) == 2
    server.request("POST", "/v1/models/nobody:predict", raw=b'{"instances": ["a"]}')
    status, metrics = server.request("GET", "/metrics")
    codes = {dict(labels)["code"] for (name, labels) in metric_samples(metrics) if name == "ptbundle_requests_total"}
    assert status == 200 and "500" not in codes
    # a refused request counts under the task it named; a name the server does not know, under "-"
    assert metric_samples(metrics)[("ptbundle_requests_total", (("code", "400"), ("task", "toy")))] >= 2
    assert metric_samples(metrics)[("ptbundle_requests_total", (("code", "404"), ("task", "-")))] >= 1
