"""`pt-run serve`: bundles behind an HTTP JSON API, with dynamic batching across requests and tasks.

The API follows KServe's V1 inference protocol (what KServe, TorchServe's
KServe mode and Seldon's servers speak), with one "model" per task:

    GET  /v1/models                      {"models": [task, ...]}
    GET  /v1/models/TASK                 {"name", "ready", "labels", "pair", "bundle"}
    POST /v1/models/TASK:predict         {"instances": ["text", ...]} or, for pair tasks,
                                         {"instances": [{"text": ..., "text_b": ...}, ...]}
                                      -> {"predictions": [{"label": ..., "probabilities": {...}}, ...]}
    GET  /metrics                        Prometheus text: requests, texts, batch sizes, latency, queue

Each bundle has one `Batcher`: texts of concurrent requests (of any of the
bundle's tasks: a merged bundle runs them in one graph) wait at most
`max_wait` for a batch of `max_batch`, then run together on one worker
thread while the event loop keeps reading requests.  A row's result does not
depend on the batch it ran in (the graph is row-independent; tests hold it
to 1e-5).

Beside it, the Open Inference Protocol (KServe V2, what Triton, MLServer and
their clients speak), on the same tasks, batchers and limits:

    GET  /v2                             {"name", "version", "extensions"}
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/TASK                 {"name", "platform", "inputs", "outputs"}
    GET  /v2/models/TASK/ready
    POST /v2/models/TASK/infer           {"id"?, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [n],
                                         "data": [...]}, (pair tasks: "text_b" too)], "outputs"?: [{"name"}]}
                                      -> {"model_name", "id"?, "outputs": [label BYTES [n],
                                         probabilities FP32 [n, labels]]}

with Triton's binary tensor data extension (tritonclient's default).

With `--task-store DIR`, the V2 model repository extension over DIR: every
subdirectory of DIR holding a manifest.json is an entry (a one-task bundle
served under the entry's name, a merged one under its tasks' names), all
loaded at start, and loaded or unloaded at run time:

    POST /v2/repository/index            [{"name": ENTRY, "state": "READY" | "UNAVAILABLE", "reason"?}, ...]
    POST /v2/repository/models/ENTRY/load     its files checked against their sha256, then Bundle.load;
                                         a failure is a 400 naming the file and changes nothing
    POST /v2/repository/models/ENTRY/unload   requests in flight are answered; new ones get a 404 naming the task

Entries whose graphs take the task tables and are the same file share one
graph, one table and one batcher (runtime.store); a load joining them reads
only the entry's own small files.

These answer 404 without a store, and 401 without `Authorization: Bearer TOKEN`
when `--repository-token` is set.  ENTRY is a plain name of DIR's (no "/",
no "..", no link leading out of DIR): anything else is a 400.  Bundles given
as arguments are not in the store and cannot be unloaded.

Errors are JSON {"error": "..."} with a 4xx status naming the problem; the
server keeps serving.  SIGTERM: uvicorn stops accepting, the
requests in flight are answered, then the process exits.

The requests' and answers' wire formats are runtime.protocol's.  This module
imports uvicorn (the `serve` extra) only in `run`; the app is plain ASGI.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .bundle import batched_logits, prediction
from .errors import InputError, PtbundleError
from .protocol import (V2_EXTENSIONS, VERSION, Limits, Reply, RequestError, header_length, json_bytes, need,
                       parse_instances, parse_json, parse_v2_inputs, parse_v2_outputs, read_body, v2_answer,
                       v2_metadata)
from .store import Prepared, Shared, TaskStore


class Metrics:
    """Requests and texts by task and status, batch sizes, latency by task and the queue, exposed in Prometheus'
    text format by prometheus_client (the serve extra, imported with the server), one registry per server."""

    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

    def __init__(self):
        import prometheus_client as prometheus  # the serve extra, as uvicorn: not on the runtime's predict path

        self.prometheus = prometheus
        self.registry = r = prometheus.CollectorRegistry()
        self.requests = prometheus.Counter("ptbundle_requests", "Requests answered, by task and HTTP status",
                                           ["task", "code"], registry=r)
        self.texts = prometheus.Counter("ptbundle_texts", "Texts predicted, by task", ["task"], registry=r)
        self.batch_sizes = prometheus.Histogram("ptbundle_batch_size", "Texts per gathered batch",
                                                buckets=self.BATCH_BUCKETS, registry=r)
        self.latency = prometheus.Histogram("ptbundle_request_seconds", "Seconds to answer a request, by task",
                                            ["task"], buckets=self.LATENCY_BUCKETS, registry=r)
        self.queue = prometheus.Gauge("ptbundle_queued_texts", "Texts waiting for a batch", registry=r)
        self.loads = prometheus.Counter("ptbundle_store_loads", "Task store entries loaded at run time", registry=r)
        self.evictions = prometheus.Counter("ptbundle_store_evictions",
                                            "Task store entries unloaded to stay within --max-loaded", registry=r)
        self.graphs = prometheus.Gauge("ptbundle_store_graphs", "Graphs the task store's loaded entries run on"
                                       " (entries sharing one graph count once)", registry=r)

    def request(self, task: str, status: int, seconds: float, texts: int) -> None:
        self.requests.labels(task, str(status)).inc()
        if status == 200:
            self.texts.labels(task).inc(texts)
            self.latency.labels(task).observe(seconds)

    def batch(self, size: int) -> None:
        self.batch_sizes.observe(size)

    def text(self) -> str:
        return self.prometheus.generate_latest(self.registry).decode()


class Queued(NamedTuple):
    """A text waiting for a batch."""

    encoding: object  # tokenizers' Encoding
    row: int  # its task's row in the graph's tables
    future: asyncio.Future  # its logits
    arrived: float  # loop time


class Batcher:
    """Collects (encoding, task index) rows of concurrent requests into batches for one bundle's model."""

    def __init__(self, model, pad_id: int, width: int, task_ids: bool, limits: Limits, metrics: Metrics):
        # width: logits per row (the widest task's); task_ids: the graph takes each row's (a merged one)
        self.model, self.pad_id, self.width, self.task_ids = model, pad_id, width, task_ids
        self.limits, self.metrics = limits, metrics
        self.queue = deque()  # Queued
        self.ready = asyncio.Event()
        # One thread runs the model (onnxruntime uses every core inside each call);
        # the event loop stays free to read and answer requests meanwhile.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ptbundle-batch")
        self.task = None
        self.active = 0  # requests holding one of this bundle's endpoints
        self.closing = False  # unloaded: stops once `active` is 0

    @classmethod
    def of(cls, bundle, limits: Limits, metrics: Metrics) -> "Batcher":
        manifest = bundle.manifest
        return cls(bundle.model, manifest.pad_id, max(len(t.labels) for t in manifest.tasks), manifest.multi_task,
                   limits, metrics)

    def start(self) -> "Batcher":
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.worker.shutdown(wait=True)

    async def logits(self, encodings, row: int) -> list:
        """`row`: the task's in the graph's tables (its index in the bundle, or its row of a store's Shared)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in encodings]
        now = loop.time()
        self.queue.extend(Queued(e, row, f, now) for e, f in zip(encodings, futures))
        self.metrics.queue.set(len(self.queue))
        self.ready.set()
        return await asyncio.gather(*futures)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.ready.clear()
                await self.ready.wait()
                continue  # look again: the wait below reads the oldest queued text
            # The oldest text waits at most max_wait for a batch to gather, counted from its arrival: texts
            # that queued while the model ran have waited already (a fresh wait after every batch cost int8
            # 15% of its throughput under 16 clients, docs/measured.md "The batcher's wait").
            waited = loop.time() - self.queue[0].arrived
            if len(self.queue) < self.limits.max_batch and waited < self.limits.max_wait:
                await asyncio.sleep(self.limits.max_wait - waited)
            rows = [self.queue.popleft() for _ in range(min(self.limits.max_batch, len(self.queue)))]
            self.metrics.queue.set(len(self.queue))
            self.metrics.batch(len(rows))
            try:
                logits = await loop.run_in_executor(self.worker, self.compute, rows)
            except Exception as e:  # a failing model call fails its rows' requests, not the server
                for q in rows:
                    if not q.future.done():
                        q.future.set_exception(e)
                continue
            for q, row in zip(rows, logits):
                if not q.future.done():  # a request whose client went away may have been cancelled
                    q.future.set_result(row)

    def compute(self, rows) -> np.ndarray:
        """Logits of the rows, in their order.  The rows run in length order, `group` at a time: on CPU a
        sentence alone costs about what it costs in a batch (docs/measured.md, "Merging, serving, streaming"), so a batch
        of mixed lengths padded to its longest would be slower than the same rows in groups of similar length."""
        tasks = np.array([q.row for q in rows], np.int32) if self.task_ids else None
        return batched_logits(self.model, [q.encoding for q in rows], self.pad_id, self.width, self.limits.group, True,
                              tasks)


@dataclass(eq=False)
class Installed:
    """A task store entry being served: what is let go when it is unloaded and no request holds it any more."""

    entry: str
    shared: Shared | None  # the graph it shares (runtime.store), or None: its own, run by `batcher`
    rows: list  # its tasks' rows in the shared tables
    names: tuple = ()  # the tasks it serves, by their served names
    batcher: Batcher | None = None
    holds: int = 0  # requests holding one of its endpoints
    used: float = 0.0  # when a request last named one of its tasks (the least recently used is unloaded first)
    unloaded: bool = False


@dataclass(frozen=True)
class Endpoint:
    """One served task: the bundle that holds it, its name there, its batcher, its row in the graph's tables."""

    bundle: object
    path: str
    task: str  # the task's name inside the bundle
    batcher: Batcher
    row: int  # the graph's task id for its rows
    installed: Installed | None = None  # set for a task store entry's


class App:
    """The ASGI application."""

    def __init__(self, bundles: dict, limits: Limits = Limits(), announce=None, store: TaskStore | None = None):
        # bundles: served name -> (Bundle, path, task name in the bundle)
        self.limits, self.metrics, self.announce = limits, Metrics(), announce
        self.bundles = bundles
        self.endpoints = {}
        self.ready = False
        self.store = store
        self.installed = {}  # store entry -> Installed, while loaded
        self.failed = {}  # store entry -> why its last load failed
        self.unloaded = {}  # served name -> the store entry it was unloaded with
        self.loading = {}  # store entry -> its load on demand, while it runs
        self.repository_lock = None

    async def startup(self) -> None:
        batchers = {}
        for name, (bundle, path, task) in self.bundles.items():
            if id(bundle) not in batchers:
                batchers[id(bundle)] = Batcher.of(bundle, self.limits, self.metrics).start()
            self.endpoints[name] = Endpoint(bundle, path, task, batchers[id(bundle)], bundle.tasks[task].index)
        self.batchers = list(batchers.values())
        if self.store is not None:  # the store's entries loaded at start (one that fails is UNAVAILABLE), up to
            self.repository_lock = asyncio.Lock()  # the bound; with on-demand loading, none until asked for
            # bundles first: a PEFT adapter loads onto the graph of a merged bundle on its backbone
            entries = sorted(self.store.entries(), key=self.store.is_adapter)
            for entry in [] if self.store.on_demand else entries[: self.store.max_loaded]:
                try:
                    self.install(self.store.prepare(entry, set(self.store.shared)))
                except (PtbundleError, RequestError) as e:
                    self.failed[entry] = self.store.quiet(str(e))
        self.ready = True
        if self.announce:
            self.announce()

    async def shutdown(self) -> None:
        self.ready = False
        for b in self.batchers:
            await b.stop()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await self.startup()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        task, texts = self.named_task(scope["path"]), 0  # a refused request counts under the task it named
        try:
            status, body, task, texts = await self.route(scope, receive)
        except RequestError as e:
            status, body = e.status, {"error": str(e)}
        except Exception as e:  # a bug must not take the server down: answer 500 and say what
            print(f"pt-run serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            status, body = 500, {"error": f"internal error ({type(e).__name__})"}
        extra = ()
        if isinstance(body, Reply):
            payload, kind, extra = body.payload, body.kind, body.headers
        elif isinstance(body, str):
            payload, kind = body.encode(), b"text/plain; version=0.0.4"
        else:
            payload, kind = json_bytes(body), b"application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(payload)).encode()), *extra]})
        await send({"type": "http.response.body", "body": payload})
        if task != "-" or status != 200:
            self.metrics.request(task, status, time.perf_counter() - started, texts)

    async def route(self, scope, receive) -> tuple:
        method, path = scope["method"], scope["path"]
        if path in ("/v2/health/live", "/v2/health/ready"):
            need(method == "GET", 405, f"{path} takes GET")
            key = path.rsplit("/", 1)[1]
            ok = self.ready if key == "ready" else True
            return (200 if ok else 503), {key: ok}, "-", 0
        if path.startswith("/v2/repository/"):
            return await self.route_repository(scope, receive)
        if path == "/v2" or path.startswith("/v2/models/"):
            return await self.route_v2(scope, receive)
        if path == "/metrics":
            need(method == "GET", 405, "/metrics takes GET")
            return 200, self.metrics.text(), "-", 0
        if path == "/v1/models":
            need(method == "GET", 405, "/v1/models takes GET")
            return 200, {"models": list(self.endpoints)}, "-", 0
        if path.startswith("/v1/models/"):
            name, _, verb = path[len("/v1/models/"):].partition(":")
            await self.on_demand(name)
            endpoint = self.endpoint(name, "task")
            if verb == "":
                need(method == "GET", 405, f"{path} takes GET")
                spec = endpoint.bundle.manifest.task(endpoint.task)
                return 200, {"name": name, "ready": self.ready, "labels": list(spec.labels), "pair": spec.pair,
                             "bundle": endpoint.path}, "-", 0
            need(verb == "predict", 404, f"unknown verb {verb!r} (use {name}:predict)")
            need(method == "POST", 405, f"{path} takes POST")
            predictions = await self.hold(endpoint, self.predict(endpoint, receive))
            return 200, {"predictions": predictions}, name, len(predictions)
        raise RequestError(404, f"no route {path} (see /v1/models or /v2)")

    async def route_v2(self, scope, receive) -> tuple:
        """The Open Inference Protocol's server and model endpoints (health is shared with V1 above)."""
        method, path = scope["method"], scope["path"]
        if path == "/v2":
            need(method == "GET", 405, "/v2 takes GET")
            extensions = list(V2_EXTENSIONS) + (["model_repository"] if self.store is not None else [])
            return 200, {"name": "ptbundle", "version": VERSION, "extensions": extensions}, "-", 0
        name, _, verb = path[len("/v2/models/"):].partition("/")
        if verb == "infer":
            await self.on_demand(name)
        endpoint = self.endpoint(name, "model")
        need(not verb.startswith("versions"), 404, f"model {name!r} has no versions (use /v2/models/{name}/...)")
        need(verb in ("", "ready", "infer"), 404, f"no route {path} (use /v2/models/{name}, /ready or /infer)")
        if verb != "infer":
            need(method == "GET", 405, f"{path} takes GET")
            if verb == "ready":
                return (200 if self.ready else 503), {"name": name, "ready": self.ready}, "-", 0
            spec = endpoint.bundle.manifest.task(endpoint.task)
            return 200, v2_metadata(name, spec.labels, spec.pair, endpoint.bundle.model.platform), "-", 0
        need(method == "POST", 405, f"{path} takes POST")
        reply, texts = await self.hold(endpoint, self.infer(name, endpoint, receive, header_length(scope)))
        return 200, reply, name, texts

    def named_task(self, path: str) -> str:
        """The task a /v1/models/NAME... or /v2/models/NAME/... path names, if it is served or was (so the metrics'
        task label takes only names the server knows); else "-"."""
        for prefix, end in (("/v1/models/", ":"), ("/v2/models/", "/")):
            if path.startswith(prefix):
                name = path[len(prefix):].partition(end)[0]
                return name if name in self.endpoints or name in self.unloaded else "-"
        return "-"

    def endpoint(self, name: str, kind: str) -> Endpoint:
        """The endpoint serving `name`; 404 naming it (and how to load it again, if it was unloaded)."""
        endpoint = self.endpoints.get(name)
        if endpoint is not None and endpoint.installed is not None:
            endpoint.installed.used = time.monotonic()
        if endpoint is None and name in self.unloaded:
            raise RequestError(404, f"{kind} {name!r} is unloaded (POST /v2/repository/models/{self.unloaded[name]}"
                                    f"/load loads it again)")
        need(endpoint is not None, 404, f"no {kind} {name!r} ({kind}s: {', '.join(self.endpoints)})")
        return endpoint

    async def hold(self, endpoint: Endpoint, work):
        """Run a request's work on an endpoint; an unloaded entry's rows are freed, and a batcher no task leads to
        stops, when the last request holding it is done."""
        batcher, installed = endpoint.batcher, endpoint.installed
        batcher.active += 1
        if installed is not None:
            installed.holds += 1
        try:
            return await work
        finally:
            batcher.active -= 1
            if installed is not None:
                installed.holds -= 1
                if installed.unloaded and installed.holds == 0 and installed.shared is not None:
                    self.release(installed)
            if batcher.closing and batcher.active == 0:
                await batcher.stop()

    async def route_repository(self, scope, receive) -> tuple:
        """The V2 model repository extension over the task store."""
        method, path = scope["method"], scope["path"]
        need(self.store is not None, 404, f"no route {path} (the repository endpoints need pt-run serve --task-store)")
        if self.store.token is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            need(hmac.compare_digest(given, b"Bearer " + self.store.token.encode()), 401,
                 f"{path} needs the header Authorization: Bearer <the server's --repository-token>")
        need(method == "POST", 405, f"{path} takes POST")
        body = await read_body(receive, self.limits.max_body)
        request = parse_json(body) if body.strip() else {}
        need(isinstance(request, dict), 400, "request must be a JSON object")
        if path == "/v2/repository/index":
            ready = request.get("ready", False)
            need(isinstance(ready, bool), 400, "\"ready\" must be true or false")
            return 200, [row for row in self.index() if row["state"] == "READY" or not ready], "-", 0
        name, _, verb = path[len("/v2/repository/models/"):].rpartition("/")
        need(path.startswith("/v2/repository/models/") and verb in ("load", "unload"), 404,
             f"no route {path} (use /v2/repository/index or /v2/repository/models/NAME/load or /unload)")
        entry = self.store_entry(name)
        if verb == "unload":
            async with self.repository_lock:
                need(entry in self.installed, 400, f"{entry!r} is not loaded")
                self.uninstall(entry)
            return 200, {}, "-", 0
        await self.load_entry(entry)
        return 200, {}, "-", 0

    def store_entry(self, name: str) -> str:
        """`name` if it is a plain entry of the store: 400 for "/", "..", or a link out of it; 404 if absent."""
        directory = self.store.directory
        need(name not in ("", ".", "..") and not any(c in name for c in "/\\\0"), 400,
             f"{name!r} is not a plain name of an entry of the task store")
        need(self.store.inside(directory / name), 400, f"{name!r} leads out of the task store")
        if not self.store.holds_one(directory / name):  # the listing only then: it reads the whole store
            entries = ", ".join(self.store.entries())
            raise RequestError(404, f"no bundle {name!r} in the task store (entries: {entries})")
        return name

    async def load_entry(self, entry: str, unless_served: str | None = None) -> None:
        """Load a store entry: its files checked and read on a worker thread, other loads alongside; then, under the
        repository lock, the least recently used entry unloaded if the bound is reached, and this one installed.
        `unless_served`: nothing happens if a task of that name is served by then (another request loaded it).
        A load that fails is 400 naming the file, and nothing else changes."""
        loop = asyncio.get_running_loop()
        try:  # on a thread and outside the lock: with more entries in use than --max-loaded, every request may
            # need a load, and loads one after another cost 3.2x the throughput (docs/measured.md, "Loading on demand")
            prepared = await loop.run_in_executor(None, self.store.prepare, entry, set(self.store.shared))
        except PtbundleError as e:
            raise self.not_loaded(entry, e) from None
        async with self.repository_lock:
            if unless_served is not None and unless_served in self.endpoints:
                return
            try:
                if prepared.bundle is None and prepared.key not in self.store.shared:  # its graph closed meanwhile
                    prepared = await loop.run_in_executor(None, self.store.prepare, entry, ())
                installed = self.install(prepared)  # (TaskStore.join may check a file too)
            except PtbundleError as e:
                raise self.not_loaded(entry, e) from None
            installed.used = time.monotonic()
            self.metrics.loads.inc()
            # Room is made once the load has succeeded, so a load that fails unloads nothing; the entry just
            # loaded is the most recently used, never the one to go.
            bound = self.store.max_loaded
            while bound is not None and len(self.installed) > bound:
                coldest = min(self.installed.values(), key=lambda i: i.used).entry
                self.uninstall(coldest)
                self.failed[coldest] = f"unloaded to make room (--max-loaded {bound}, least recently used)"
                self.metrics.evictions.inc()

    def not_loaded(self, entry: str, error: Exception) -> RequestError:
        """A failed load's 400, naming the file; the index lists the entry UNAVAILABLE with the same reason."""
        self.failed[entry] = self.store.quiet(str(error))
        return RequestError(400, f"{entry}: not loaded: {self.failed[entry]}")

    async def on_demand(self, name: str) -> None:
        """Load the store entry a request names, if the store loads on demand and it is not loaded."""
        if self.store is None or not self.store.on_demand or name in self.endpoints:
            return
        try:
            entry = self.store_entry(name)
        except RequestError:
            return  # not a store entry: the request's own 404 says so
        loading = self.loading.get(entry)
        if loading is None:  # the first request for it loads it; the others wait for that load, and share its error
            loading = self.loading[entry] = asyncio.ensure_future(self.load_entry(entry, unless_served=name))
            # (its error read here too, or asyncio would log it as never retrieved once no request waits for it)
            loading.add_done_callback(lambda done: (self.loading.pop(entry, None),
                                                    done.cancelled() or done.exception()))
        await asyncio.shield(loading)  # a request whose client goes away does not cancel the others' load

    def index(self) -> list:
        rows = []
        for entry in self.store.entries():
            if entry in self.installed:
                rows.append({"name": entry, "state": "READY"})
            else:
                rows.append({"name": entry, "state": "UNAVAILABLE", "reason": self.failed.get(entry, "unloaded")})
        return rows

    def install(self, prepared: Prepared) -> Installed:
        """Serve a store entry's tasks (replacing what it served before); nothing changes if a name clashes."""
        entry = prepared.entry
        bundle, shared, rows = self.store.join(prepared)
        installed = Installed(entry, shared, rows)
        try:
            served = endpoints_of([(None, str(prepared.directory))], [bundle])
            for name in served:
                owner = self.endpoints.get(name)
                need(owner is None or (owner.installed is not None and owner.installed.entry == entry), 409,
                     f"{entry}: task {name!r} is already served by {owner.path if owner else ''}")
        except InputError as e:  # a bundle pt-run serve cannot serve (a generation bundle): the entry's 400
            self.let_go(installed)
            raise self.not_loaded(entry, e) from None
        except RequestError:
            self.let_go(installed)
            raise
        if entry in self.installed:
            self.uninstall(entry)
        batcher = shared.batcher if shared is not None else None
        if batcher is None:
            batcher = Batcher.of(bundle, self.limits, self.metrics) if shared is None else Batcher(
                shared.model, shared.pad_id, shared.width, True, self.limits, self.metrics)
            self.batchers.append(batcher.start())
            if shared is not None:
                shared.batcher = batcher
        installed.batcher, installed.names = batcher, tuple(served)
        for name, (_, path, task) in served.items():
            self.endpoints[name] = Endpoint(bundle, path, task, batcher, rows[bundle.tasks[task].index], installed)
            self.unloaded.pop(name, None)
        self.installed[entry] = installed
        self.failed.pop(entry, None)
        self.count_graphs()
        return installed

    def uninstall(self, entry: str) -> None:
        installed = self.installed.pop(entry)
        for name in installed.names:
            self.endpoints.pop(name)
        self.unloaded.update((n, entry) for n in installed.names)
        self.let_go(installed)

    def let_go(self, installed: Installed) -> None:
        """An entry unloaded: its own batcher closes once its requests are answered; its rows of a shared graph
        are freed once no request holds it (hold)."""
        installed.unloaded = True
        if installed.shared is None:
            if installed.batcher is not None:
                self.close(installed.batcher)
        elif installed.holds == 0:
            self.release(installed)
        self.count_graphs()

    def release(self, installed: Installed) -> None:
        shared, rows = installed.shared, installed.rows
        if rows is None:
            return
        installed.rows = None
        shared.release(rows)
        if shared.empty and self.store.shared.get(shared.key) is shared:  # its last entry: the graph goes
            del self.store.shared[shared.key]
            if shared.batcher is not None:
                self.close(shared.batcher)
        self.count_graphs()

    def count_graphs(self) -> None:
        if self.store is not None:
            own = sum(i.shared is None for i in self.installed.values())
            self.metrics.graphs.set(own + len(self.store.shared))

    def close(self, batcher: Batcher) -> None:
        """Stop a batcher no endpoint leads to any more, once the requests holding it are answered."""
        batcher.closing = True
        self.batchers.remove(batcher)
        if batcher.active == 0:
            asyncio.get_running_loop().create_task(batcher.stop())

    async def infer(self, name: str, endpoint: Endpoint, receive, json_size: int | None) -> tuple:
        """A V2 infer request -> (its answer, how many texts)."""
        body = await read_body(receive, self.limits.max_body)
        head, tail = (body, b"") if json_size is None else (body[:json_size], body[json_size:])
        request = parse_json(head)
        spec = endpoint.bundle.manifest.task(endpoint.task)
        texts, texts_b = parse_v2_inputs(request, tail, spec.pair, self.limits)
        outputs = parse_v2_outputs(request)
        try:
            encodings = endpoint.bundle.encode(texts, texts_b if spec.pair else None, endpoint.task)
        except InputError as e:
            raise RequestError(400, str(e)) from None
        rows = await endpoint.batcher.logits(encodings, endpoint.row)
        predictions = [prediction(spec.labels, row) for row in rows]
        return v2_answer(name, request.get("id"), outputs, spec.labels, predictions), len(texts)

    async def predict(self, endpoint: Endpoint, receive) -> list:
        request = parse_json(await read_body(receive, self.limits.max_body))
        spec = endpoint.bundle.manifest.task(endpoint.task)
        texts, texts_b = parse_instances(request, spec.pair, self.limits)
        try:
            encodings = endpoint.bundle.encode(texts, texts_b if spec.pair else None, endpoint.task)
        except InputError as e:
            raise RequestError(422, str(e)) from None
        rows = await endpoint.batcher.logits(encodings, endpoint.row)
        return [prediction(spec.labels, row).to_dict() for row in rows]


def endpoints_of(specs: list, bundles: list) -> dict:
    """Served name -> (Bundle, path, task): a one-task bundle under its directory's name (or NAME=), each task of a
    merged bundle under its own name."""
    out = {}
    for (name, path), bundle in zip(specs, bundles):
        if bundle.manifest.generative:  # refused at start: its every :predict would fail
            raise InputError(f"{path}: a generation bundle: pt-run serve serves classifiers (:predict answers"
                             f" labels); generate with it by pt-run generate or Bundle.generate")
        if bundle.manifest.several:
            if name:
                raise InputError(f"{name}={path}: NAME= names a one-task bundle; {path} serves its tasks by their"
                                 f" names ({', '.join(bundle.task_names)})")
            pairs = [(t, t) for t in bundle.task_names]
        else:
            pairs = [(name or path.rstrip("/").rsplit("/", 1)[-1], bundle.task_names[0])]
        for served, task in pairs:
            if served in out:
                raise InputError(f"two bundles serve a task named {served!r} ({out[served][1]} and {path}):"
                                 f" rename one with NAME=BUNDLE")
            out[served] = (bundle, path, task)
    return out


def run(bundles: dict, host: str, port: int, limits: Limits, log, store: TaskStore | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C (uvicorn answers the requests in flight first)."""
    try:  # the serve extra: imported only when a server starts (prometheus_client by Metrics)
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError:
        raise InputError("pt-run serve needs the serve extra: pip install 'ptbundle[serve]'") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio turns Nagle's algorithm off only on sockets that
    # say so, and with it on, a keep-alive client waited 40 ms (a delayed ACK) for each answer's body.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)  # from here connections queue, even before uvicorn's loop accepts them
    bound = sock.getsockname()[1]
    where = f"[{host}]" if family == socket.AF_INET6 else host

    def announce():
        log(f"pt-run serve: listening on http://{where}:{bound} (tasks: {', '.join(app.endpoints)}; max batch"
            f" {limits.max_batch}, max wait {limits.max_wait * 1000:g} ms)")
        for entry, reason in app.failed.items():
            log(f"pt-run serve: task store entry {entry} not loaded: {reason}")

    app = App(bundles, limits, announce, store)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])
