"""A real `pt-run serve` process on the loopback address, answered by a real HTTP client (http.client)."""

import http.client
import json
import signal
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

PT_RUN = str(Path(sys.executable).parent / "pt-run")


class Server:
    def __init__(self, *args):
        self.process = subprocess.Popen([PT_RUN, "serve", *map(str, args), "--port", "0"], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        line = self.process.stderr.readline()  # "pt-run serve: listening on http://127.0.0.1:PORT ..."
        assert "listening on http://127.0.0.1:" in line, line + self.process.stderr.read()
        self.port = int(line.split("127.0.0.1:")[1].split()[0])

    def request(self, method, path, body=None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        kind = response.getheader("content-type", "")
        return response.status, json.loads(data) if kind.startswith("application/json") else data.decode()

    def predict(self, task, instances):
        return self.request("POST", f"/v1/models/{task}:predict", {"instances": instances})

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def metric_samples(text: str) -> dict:
    """/metrics read by Prometheus' own parser: (sample name, sorted label items) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
