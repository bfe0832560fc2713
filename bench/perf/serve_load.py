"""Load test of `pt-run serve`: concurrent clients against a server on the loopback address.

    .venv/bin/python bench/perf/serve_load.py [--bundle exports/mr-soft ...] [--clients 16] [--requests 10000]

Starts `pt-run serve BUNDLE... --host 127.0.0.1 --port 0` in a new process
and sends it requests of one text each (KServe V1, runtime/serve.py), every
text an MR test or dev sentence (pair tasks: two of them), the tasks taken
in turn.  Every answer is checked against what `Bundle.predict` gives for
that text alone (label, and probabilities within 1e-4): a request answered
with another's result counts as wrong.  Phases, all in this one run:

  one at a time   one client, --sequential-requests requests, each sent after the last is answered
  concurrent      --clients clients, --requests requests in all
  faults          the concurrent load again, plus clients that disconnect mid-request
                  and a burst of malformed requests; every 200 must be right, every bad one a 4xx
  sigterm         the concurrent load, SIGTERM after --sigterm-after seconds: every request
                  answered 200 must be right; the others must fail as refused connections, not
                  as wrong or half answers

Reports throughput (requests/s), latency p50/p99, the server's batch-size
histogram (from /metrics) and errors per phase, and the concurrent/one-at-a-
time throughput ratio.  Every loop is bounded in count and in --time-limit
seconds.  Writes <results>/serve_load.json.

With --store-tasks N, the task store instead (`pt-run serve --task-store`):

    .venv/bin/python bench/perf/serve_load.py --store-tasks 100 [--bundle exports/mr-soft] [--int8]

N entries on one graph: the bundle merged alone (`pt-build merge`: its graph
takes the task tables) as s000, and s001.. copies of it whose float tables
(prompt and head) are multiplied by (1 + 0.01 * standard normal noise, seeded),
renamed, their manifests rehashed, their other files hard links to s000's
(the same graph file, as a store of tasks on one backbone holds it).  Every
answer is checked against the entry's own `Bundle.predict` of that text alone.
Phases, one server process:

  baseline    Bundle.logits of s000 in this process on the phase's texts: at batch --clients (all that
              --clients one-text clients can have in flight) in the order the requests are sent (the
              batches the server can form at best), and sorted by length (the default, which no
              server can do: it never holds the texts to come); at 64 sorted; sentences/s, median
              [min-max] of 3 passes
  store       --clients clients, --requests requests of one text, over the N tasks in turn
  churn       the same, while every --churn-every seconds one loaded entry is unloaded and the one
              unloaded before is loaded (POST /v2/repository/models/NAME/unload, /load): requests for
              the entry being unloaded must be answered or get the 404 naming it; every load timed

  adapters    --store-adapters K copies of the bundle's own PEFT adapter (its peft/) put into the store as
              entries a000.. and loaded one by one through the repository (each load timed): each becomes
              a row of the open graph; then the store phase's requests over the adapters and the entries,
              an adapter's answers checked against s000's (the same task, merged)

  bounded    with --max-loaded M (M < N): the store phase's requests against a second server,
              `--load-on-demand --max-loaded M`: more tasks in use than may be loaded, so requests load
              entries and unload the least recently used (in turn over N tasks, nearly every request);
              loads and unloads counted from /metrics

Reports served sentences/s over Bundle.logits' (the overhead of the server),
load times p50 / max, and the errors; exits 1 if an answer is wrong or lost.
Writes <results>/serve_store.json.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np
from prometheus_client.parser import text_string_to_metric_families  # the serve extra, as pt-run serve needs
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

HOST = "127.0.0.1"  # loopback only: nothing else is ever a target


class Server:
    def __init__(self, bundles, max_batch: int, max_wait_ms: float, group: int, int8: bool):
        # bundles: pt-run serve's arguments before its options (bundles, or --task-store DIR)
        args = [common.tool("pt-run"), "serve", *bundles, "--host", HOST, "--port", "0", "--max-batch",
                str(max_batch), "--max-wait-ms", str(max_wait_ms), "--group", str(group)] + (["--int8"] if int8 else [])
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.process.stderr.readline()
        if "listening on" not in line:
            raise SystemExit(f"pt-run serve did not start: {line}{self.process.stderr.read()}")
        self.port = int(line.split(f"{HOST}:")[1].split()[0])

    def get(self, path: str) -> str:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        conn.request("GET", path)
        body = conn.getresponse().read().decode()
        conn.close()
        return body

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def samples(metrics: str) -> list:
    """A /metrics text read by Prometheus' own parser: its samples (name, labels, value), in order."""
    return [s for family in text_string_to_metric_families(metrics) for s in family.samples]


def batch_histogram(metrics: str) -> dict:
    """Cumulative bucket counts of ptbundle_batch_size -> {upper bound: batches}."""
    return {s.labels["le"]: int(s.value) for s in samples(metrics) if s.name == "ptbundle_batch_size_bucket"}


def histogram_delta(before: dict, after: dict) -> dict:
    """Batches per bucket (not cumulative) between two /metrics reads."""
    out, previous = {}, 0
    for bound in after:
        cumulative = after[bound] - before.get(bound, 0)
        out[bound] = cumulative - previous
        previous = cumulative
    return {k: v for k, v in out.items() if v}


def requests_of(tasks: dict, texts: list, n: int, seed: int) -> list:
    """n (task, text, text_b) requests: tasks in turn, texts drawn with a fixed seed."""
    rng = random.Random(seed)
    names = list(tasks)
    return [(names[i % len(names)], rng.choice(texts), rng.choice(texts) if tasks[names[i % len(names)]] else None)
            for i in range(n)]


def expected_answers(served: dict, rows: list, int8: bool) -> dict:
    """(task, text, text_b) -> Prediction, each computed alone by Bundle.predict (on the graph the server runs)."""
    loaded = {path: common.open_bundle(path, int8=int8) for path, _ in served.values()}
    out = {}
    for key in set(rows):
        task, a, b = key
        path, inner = served[task]
        out[key] = loaded[path].predict([a], None if b is None else [b],
                                        task=inner if loaded[path].manifest.multi_task else None)[0]
    return out


def body_of(a, b) -> bytes:
    return json.dumps({"instances": [a if b is None else {"text": a, "text_b": b}]}).encode()


def run_clients(port: int, rows: list, clients: int, expected: dict, deadline: float,
                on_start=None, allowed_404: str | None = None) -> dict:
    """Send `rows` from `clients` threads (each its own keep-alive connection); check every answer.  A 404 whose
    error says `allowed_404` counts as refused_unloaded, not as an error."""
    latencies, lock = [], threading.Lock()
    counts = {"ok": 0, "wrong": 0, "refused_unloaded": 0, "http_errors": 0, "connection_errors": 0}
    cursor = iter(range(len(rows)))

    def client():
        conn = None
        while time.time() < deadline:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            task, a, b = rows[i]
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, port, timeout=60)
                    conn.connect()
                    # As urllib3 and most clients do: http.client writes headers and body
                    # separately, and with Nagle's algorithm the body would wait for the
                    # server's delayed ACK (40 ms a request).
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.request("POST", f"/v1/models/{task}:predict", body_of(a, b), {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                with lock:
                    counts["connection_errors"] += 1
                if conn is not None:
                    conn.close()
                conn = None
                continue
            seconds = time.perf_counter() - started
            with lock:
                if response.status != 200:
                    unloaded = response.status == 404 and allowed_404 and allowed_404 in data.decode()
                    counts["refused_unloaded" if unloaded else "http_errors"] += 1
                    continue
                got = json.loads(data)["predictions"][0]
                want = expected[rows[i]]
                right = got["label"] == want.label and all(abs(got["probabilities"][k] - v) <= 1e-4
                                                           for k, v in want.probabilities.items())
                counts["ok" if right else "wrong"] += 1
                latencies.append(seconds)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    if on_start:
        on_start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else None
    return {**counts, "sent": sum(counts.values()),
            "seconds": round(elapsed, 2), "requests_per_second": round(counts["ok"] / elapsed, 1),
            "latency_ms": {"p50": pick(0.50), "p99": pick(0.99), "max": pick(1.0)}}


def disconnecting_client(port: int, task: str, n: int, deadline: float) -> int:
    """Requests abandoned mid-way: half a body, or a whole request whose answer is never read."""
    sent = 0
    for i in range(n):
        if time.time() > deadline:
            break
        body = body_of("a gorgeous, witty, seductive movie.", None)
        head = (f"POST /v1/models/{task}:predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(head.encode() + (body[: len(body) // 2] if i % 2 else body))
        sent += 1
        time.sleep(0.01)
    return sent


def bad_burst(port: int, task: str, n: int) -> dict:
    """Malformed requests of several kinds; each must get a 4xx with a JSON error."""
    kinds = [b"{not json", b'{"instances": [""]}', b'{"instances": "x"}', b'{"texts": []}', b'{"instances": [7]}']
    statuses = {}
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    for i in range(n):
        conn.request("POST", f"/v1/models/{task}:predict", kinds[i % len(kinds)], {"Content-Type": "application/json"})
        response = conn.getresponse()
        error = json.loads(response.read()).get("error")
        key = str(response.status) if error else f"{response.status} without error"
        statuses[key] = statuses.get(key, 0) + 1
    conn.close()
    return statuses


# --- the task store (--store-tasks) ----------------------------------------------------------

STORE_NOISE = 0.01  # each float table of a copied entry is x * (1 + STORE_NOISE * standard normal)


def entry_name(i: int) -> str:
    return f"s{i:03d}"


def store_entries(bundle: Path, n: int, out: Path, int8: bool, backbone) -> list:
    """The N entries (module docstring) under `out`; their names."""
    PROMPT, MANIFEST, Manifest = common.PROMPT_FILE, common.MANIFEST_FILE, common.Manifest
    first = out / entry_name(0)
    done = subprocess.run([common.tool("pt-build"), "merge", f"{entry_name(0)}={bundle}", "--out", str(first)]
                          + (["--quantize", "int8"] if int8 else []) + (["--backbone", str(backbone)] if backbone else []),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pt-build merge {bundle} failed: {done.stderr.strip().splitlines()[-1]}")
    manifest, tables = Manifest.read(first), load_file(str(first / PROMPT))
    rng = np.random.default_rng(0)
    for i in range(1, n):
        d = out / entry_name(i)
        d.mkdir()
        for f in first.iterdir():
            if f.is_file() and f.name not in (PROMPT, MANIFEST):
                os.link(f, d / f.name)
        save_file({k: (v * (1 + STORE_NOISE * rng.standard_normal(v.shape))).astype(v.dtype)
                   if v.dtype == np.float32 else v for k, v in tables.items()}, str(d / PROMPT))
        task = manifest.only.replace(name=entry_name(i))
        manifest.replace(tasks=(task,), files={**manifest.files, PROMPT: common.sha256_file(d / PROMPT)}).write(d)
    return [entry_name(i) for i in range(n)]


def adapter_name(i: int) -> str:
    return f"a{i:03d}"


def adapters_phase(port: int, bundle: Path, store: Path, k: int, entries: list, texts: list, clients: int,
                   total: int, expected_of, time_limit: float) -> dict:
    """K copies of the bundle's peft/ loaded into the running store, then requests over them and the entries."""
    source = bundle / "peft"
    if not (source / "adapter_config.json").is_file():
        return {"skipped": f"{bundle} has no PEFT adapter (peft/)"}
    names = [adapter_name(i) for i in range(k)]
    loads, failures = [], []
    for name in names:
        shutil.copytree(source, store / name)
        status, seconds = repository(port, f"/v2/repository/models/{name}/load")
        failures += [f"load {name}: {status}"] if status != 200 else []
        loads.append(seconds)
    loads.sort()
    rows = requests_of({n: False for n in names + entries}, texts, total, 4)
    expected = expected_of(rows)
    result = run_clients(port, rows, clients, expected, time.time() + time_limit)
    result["repository"] = {"adapters": k, "failures": failures, "load_ms": {
        "p50": round(1000 * loads[len(loads) // 2], 1), "max": round(1000 * loads[-1], 1)}}
    return result


def store_expected(store: Path, rows: list, int8: bool) -> dict:
    """(entry, text, None) -> Prediction of the entry's own bundle for that text alone."""
    out = {}
    for entry in sorted({r[0] for r in rows}):
        # an adapter a000.. is a copy of the bundle's peft/: the task s000 is, merged, its labels named as
        # transformers names them (a PEFT adapter does not carry names)
        adapter = common.is_adapter(store / entry)
        bundle = common.open_bundle(store / (entry_name(0) if adapter else entry), int8=int8)
        texts = sorted({r[1] for r in rows if r[0] == entry})
        for text, p in zip(texts, bundle.predict(texts, batch_size=1)):
            if adapter:
                labels = bundle.manifest.only.labels
                names = dict(zip(labels, common.adapter_labels(len(labels))))
                p = dataclasses.replace(p, label=names[p.label],
                                        probabilities={names[k]: v for k, v in p.probabilities.items()})
            out[(entry, text, None)] = p
    return out


def logits_rate(bundle, texts: list, batch_size: int, by_length: bool, repeats: int = 3) -> dict:
    """Sentences/s of Bundle.logits over `texts`, median [min-max] of `repeats` passes after a warm-up."""
    bundle.logits(texts[: 2 * batch_size], batch_size=batch_size, sort_by_length=by_length)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        bundle.logits(texts, batch_size=batch_size, sort_by_length=by_length)
        rates.append(len(texts) / (time.perf_counter() - started))
    return common.spread(rates, 1)


def over_logits(result: dict, baseline: dict) -> dict:
    """Served requests/s over each Bundle.logits baseline's median: the server's share of the model's speed."""
    return {k: round(result["requests_per_second"] / v["median"], 3) for k, v in baseline.items()}


def peak_rss_mb(pid: int) -> float | None:
    """A process's peak resident memory (VmHWM), where /proc has it."""
    try:
        line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return None


def repository(port: int, path: str) -> tuple:
    """POST a repository call: (status, seconds)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    started = time.perf_counter()
    conn.request("POST", path, b"{}", {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, time.perf_counter() - started


def churn(port: int, entries: list, every: float, stop: threading.Event, report: dict) -> None:
    """Every `every` seconds: unload the next entry, load the one unloaded before (its load timed)."""
    loads, failures, out = [], [], None
    for k in range(10**9):
        if stop.wait(every):
            break
        name = entries[(7 * k) % len(entries)]
        status, _ = repository(port, f"/v2/repository/models/{name}/unload")
        failures += [f"unload {name}: {status}"] if status != 200 else []
        if out is not None:
            status, seconds = repository(port, f"/v2/repository/models/{out}/load")
            failures += [f"load {out}: {status}"] if status != 200 else []
            loads.append(seconds)
        out = name
    if out is not None:  # everything loaded again for what follows
        status, seconds = repository(port, f"/v2/repository/models/{out}/load")
        loads.append(seconds)
    loads.sort()
    report.update(cycles=len(loads), failures=failures, load_ms={
        "p50": round(1000 * loads[len(loads) // 2], 1) if loads else None,
        "max": round(1000 * loads[-1], 1) if loads else None})


def store_run(bundle: Path, n: int, texts: list, clients: int, total: int, max_batch: int, max_wait_ms: float,
              group: int, int8: bool, every: float, time_limit: float, results, smoke: bool, backbone,
              max_loaded: int | None = None, adapters: int = 0) -> None:
    with tempfile.TemporaryDirectory(prefix="ptbundle-store-") as work:
        store = Path(work)
        started = time.time()
        entries = store_entries(bundle, n, store, int8, backbone)
        common.log(f"{n} store entries in {time.time() - started:.0f} s")
        tasks = {e: False for e in entries}
        rows = {"store": requests_of(tasks, texts, total, 1), "churn": requests_of(tasks, texts, total, 2)}
        expected = store_expected(store, [r for phase in rows.values() for r in phase], int8)
        common.log(f"expected answers of {len(expected)} requests, each entry's own bundle")
        first = common.open_bundle(store / entries[0], int8=int8)
        phase_texts = [t for _, t, _ in rows["store"]]
        report = {"machine": common.machine_info(), "bundle": str(bundle), "entries": n, "clients": clients,
                  "max_batch": max_batch, "max_wait_ms": max_wait_ms, "group": group, "int8": int8, "smoke": smoke,
                  "churn_every_seconds": every,
                  "baseline": {f"batch {b} {'sorted' if s else 'in request order'}":
                               logits_rate(first, phase_texts, b, s) for b, s in ((clients, False), (clients, True),
                                                                                  (64, True))},
                  "phases": {}}
        del first
        print(f"baseline    Bundle.logits: {report['baseline']} sentences/s", flush=True)
        server = Server(["--task-store", str(store)], max_batch, max_wait_ms, group, int8)
        try:
            metrics = server.get("/metrics")
            report["graphs_open"] = next(s.value for s in samples(metrics) if s.name == "ptbundle_store_graphs")
            run_clients(server.port, rows["store"][: 20 * clients], clients, expected, time.time() + time_limit)  # warm-up
            for name in ("store", "churn"):
                cycle, stop = {}, threading.Event()
                mover = threading.Thread(target=churn, args=(server.port, entries, every, stop, cycle))
                result = run_clients(server.port, rows[name], clients, expected, time.time() + time_limit,
                                     mover.start if name == "churn" else None, allowed_404="is unloaded")
                if name == "churn":
                    stop.set()
                    mover.join()
                    result["repository"] = cycle
                result["served_over_logits"] = over_logits(result, report["baseline"])
                report["phases"][name] = result
                print(f"{name:<11} {result['ok']:>6} ok {result['wrong']} wrong {result['refused_unloaded']} refused"
                      f" as unloaded {result['http_errors']} http errors {result['connection_errors']} connection"
                      f" errors; {result['requests_per_second']} req/s ({result['served_over_logits']} of"
                      f" Bundle.logits), p50 {result['latency_ms']['p50']} ms"
                      + (f"; {cycle['cycles']} loads, p50 {cycle['load_ms']['p50']} ms, max"
                         f" {cycle['load_ms']['max']} ms, failures {cycle['failures']}" if name == "churn" else ""),
                      flush=True)
            if adapters:
                result = adapters_phase(server.port, bundle, store, adapters, entries, texts, clients, total,
                                        lambda r: store_expected(store, r, int8), time_limit)
                if "skipped" not in result:
                    result["served_over_logits"] = over_logits(result, report["baseline"])
                    cycle = result["repository"]
                    print(f"adapters    {result['ok']:>6} ok {result['wrong']} wrong {result['http_errors']} http"
                          f" errors {result['connection_errors']} connection errors; {result['requests_per_second']}"
                          f" req/s over {adapters} adapters and {n} entries; {adapters} adapter loads, p50"
                          f" {cycle['load_ms']['p50']} ms, max {cycle['load_ms']['max']} ms, failures"
                          f" {cycle['failures']}", flush=True)
                else:
                    print(f"adapters    skipped: {result['skipped']}", flush=True)
                report["adapters"] = result
            report["server_peak_rss_mb"] = peak_rss_mb(server.process.pid)
            print(f"server: {report['graphs_open']:g} graph(s) open for {n} entries, peak RSS"
                  f" {report['server_peak_rss_mb']} MB", flush=True)
        finally:
            server.stop()
        if max_loaded:
            report["phases"]["bounded"] = bounded_run(store, max_loaded, rows["store"], clients, expected, max_batch,
                                                      max_wait_ms, group, int8, time_limit, report["baseline"])
        phases = report["phases"].values()
        adapted = report.get("adapters") or {"skipped": "not asked for"}
        report["ok"] = all(p["wrong"] == 0 and p["http_errors"] == 0 and p["connection_errors"] == 0
                           and p["sent"] == len(rows["store"]) for p in phases) \
            and not report["phases"]["churn"]["repository"]["failures"] \
            and ("skipped" in adapted or (adapted["wrong"] == adapted["http_errors"] == adapted["connection_errors"]
                                          == 0 and adapted["sent"] == total and not adapted["repository"]["failures"]))
        common.write_results(results, "serve_store", report)
        if not report["ok"]:
            raise SystemExit("serve_load --store-tasks: a request was lost, wrong or refused (see the results)")


def bounded_run(store: Path, max_loaded: int, rows: list, clients: int, expected: dict, max_batch: int,
                max_wait_ms: float, group: int, int8: bool, time_limit: float, baseline: dict) -> dict:
    """The store phase's requests against a server that loads on demand and keeps at most `max_loaded` entries."""
    server = Server(["--task-store", str(store), "--load-on-demand", "--max-loaded", str(max_loaded)], max_batch,
                    max_wait_ms, group, int8)
    try:
        run_clients(server.port, rows[: 20 * clients], clients, expected, time.time() + time_limit)  # warm-up
        counted = lambda: {s.name: s.value for s in samples(server.get("/metrics"))  # noqa: E731
                           if s.name in ("ptbundle_store_loads_total", "ptbundle_store_evictions_total")}
        before = counted()
        result = run_clients(server.port, rows, clients, expected, time.time() + time_limit)
        after = counted()
    finally:
        server.stop()
    grew = {name: after[name] - before[name] for name in after}
    result.update(max_loaded=max_loaded, loads=grew["ptbundle_store_loads_total"],
                  evictions=grew["ptbundle_store_evictions_total"],
                  served_over_logits=over_logits(result, baseline))
    print(f"bounded     {result['ok']:>6} ok {result['wrong']} wrong {result['http_errors']} http errors"
          f" {result['connection_errors']} connection errors; {result['requests_per_second']} req/s with at most"
          f" {max_loaded} loaded: {result['loads']:g} loads, {result['evictions']:g} unloaded to make room,"
          f" p50 {result['latency_ms']['p50']} ms", flush=True)
    return result


@click.command()
@click.option("--bundle", "bundles", multiple=True, default=["exports/mr-soft"], show_default=True,
              help="Bundle to serve (NAME=BUNDLE renames a one-task bundle); repeat for several.")
@common.options()
@click.option("--clients", default=16, show_default=True)
@click.option("--requests", "total", default=10000, show_default=True, help="Requests of the concurrent phases.")
@click.option("--sequential-requests", default=1000, show_default=True)
@click.option("--max-batch", default=64, show_default=True)
@click.option("--max-wait-ms", default=2.0, show_default=True)
@click.option("--group", default=16, show_default=True, help="pt-run serve --group.")
@click.option("--int8", is_flag=True, help="Serve the int8 graphs.")
@click.option("--sigterm-after", default=5.0, show_default=True, help="Seconds into the sigterm phase.")
@click.option("--time-limit", default=900.0, show_default=True, help="Seconds each phase may take at most.")
@click.option("--store-tasks", default=0, show_default=True, help="Run the task store phases over this many entries"
              " made from the (first) --bundle instead (module docstring).")
@click.option("--churn-every", default=1.0, show_default=True, help="Seconds between unload/load cycles (store).")
@click.option("--max-loaded", type=click.IntRange(1), default=None, help="With --store-tasks: also the bounded phase,"
              " at most this many entries loaded (module docstring).")
@click.option("--store-adapters", "adapters", default=10, show_default=True, help="With --store-tasks: PEFT adapter"
              " entries loaded into the running store (the adapters phase; 0: none).")
def main(bundles, backbone, data, smoke, results, clients, total, sequential_requests, max_batch, max_wait_ms, group,
         int8, sigterm_after, time_limit, store_tasks, churn_every, max_loaded, adapters):
    if smoke:
        clients, total, sequential_requests, sigterm_after = 4, 120, 40, 0.5
        store_tasks, churn_every, adapters = min(store_tasks, 5), min(churn_every, 0.02), min(adapters, 3)
    dataset = common.load_data(data)
    texts = [e.text for e in list(dataset.test or []) + list(dataset.dev)]
    if store_tasks:
        return store_run(Path(bundles[0]), store_tasks, texts, clients, total, max_batch, max_wait_ms, group, int8,
                         churn_every, time_limit, results, smoke, backbone, max_loaded, adapters)
    server = Server(bundles, max_batch, max_wait_ms, group, int8)
    try:
        models = json.loads(server.get("/v1/models"))["models"]
        tasks = {m: json.loads(server.get(f"/v1/models/{m}"))["pair"] for m in models}
        served = {m: (json.loads(server.get(f"/v1/models/{m}"))["bundle"], m) for m in models}
        rows = {"sequential": requests_of(tasks, texts, sequential_requests, 0),
                "concurrent": requests_of(tasks, texts, total, 1), "faults": requests_of(tasks, texts, total // 4, 2),
                "sigterm": requests_of(tasks, texts, total, 3)}
        started = time.time()
        expected = expected_answers(served, [r for phase in rows.values() for r in phase], int8)
        print(f"expected answers of {len(expected)} distinct requests in {time.time() - started:.0f} s", flush=True)
        report = {"machine": common.machine_info(), "bundles": list(bundles), "tasks": tasks, "clients": clients,
                  "max_batch": max_batch, "max_wait_ms": max_wait_ms, "group": group, "int8": int8, "smoke": smoke,
                  "phases": {}}

        def phase(name, n_clients, on_start=None):
            before = batch_histogram(server.get("/metrics"))
            result = run_clients(server.port, rows[name], n_clients, expected, time.time() + time_limit, on_start)
            try:
                result["batch_sizes"] = histogram_delta(before, batch_histogram(server.get("/metrics")))
            except OSError:  # the sigterm phase: the server is gone
                result["batch_sizes"] = None
            report["phases"][name] = result
            print(f"{name:<11} {result['ok']:>6} ok {result['wrong']} wrong {result['http_errors']} http errors "
                  f"{result['connection_errors']} connection errors; {result['requests_per_second']} req/s, "
                  f"p50 {result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} ms; "
                  f"batches {result['batch_sizes']}", flush=True)
            return result

        phase("sequential", 1)
        phase("concurrent", clients)
        extra = {}

        first_single = next((m for m in models if not tasks[m]), models[0])

        disconnecting = threading.Thread(target=lambda: extra.update(disconnected=disconnecting_client(
            server.port, first_single, 20 if smoke else 200, time.time() + time_limit)), daemon=True)

        def faults():
            disconnecting.start()
            extra["bad"] = bad_burst(server.port, first_single, 20 if smoke else 500)

        phase("faults", clients, faults)
        disconnecting.join()
        report["phases"]["faults"].update(extra)
        print(f"faults: {extra}", flush=True)

        def terminate():
            time.sleep(sigterm_after)
            report["sigterm_sent_after_seconds"] = sigterm_after
            server.process.send_signal(signal.SIGTERM)

        phase_result = phase("sigterm", clients, terminate)
        report["server_exit_status"] = server.process.wait(timeout=60)
        phase_result["not_sent_before_shutdown"] = len(rows["sigterm"]) - phase_result["sent"]
        seq, conc = report["phases"]["sequential"], report["phases"]["concurrent"]
        report["concurrent_over_sequential"] = round(conc["requests_per_second"] / seq["requests_per_second"], 2)
        wrong = sum(p["wrong"] for p in report["phases"].values())
        report["ok"] = wrong == 0 and conc["http_errors"] == 0 and conc["connection_errors"] == 0 and \
            all(k.isdigit() and 400 <= int(k) < 500 for k in extra.get("bad", {})) and \
            report["phases"]["faults"]["http_errors"] == 0
        print(f"concurrent / one at a time: {report['concurrent_over_sequential']}x; wrong answers: {wrong};"
              f" server exit {report['server_exit_status']}", flush=True)
        common.write_results(results, "serve_load", report)
        if not report["ok"]:
            raise SystemExit("serve_load: a request was lost, wrong or refused (see the results)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
