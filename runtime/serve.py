"""`pt-run serve`: bundles behind an HTTP JSON API, with dynamic batching across requests and tasks.

The API follows KServe's V1 inference protocol (what KServe, TorchServe's
KServe mode and Seldon's servers speak), with one "model" per task:

    GET  /v1/models                      {"models": [task, ...]}
    GET  /v1/models/TASK                 {"name", "ready", "labels", "pair", "bundle"}
    POST /v1/models/TASK:predict         {"instances": ["text", ...]} or, for pair tasks,
                                         {"instances": [{"text": ..., "text_b": ...}, ...]}
                                      -> {"predictions": [{"label": ..., "probabilities": {...}}, ...]}
    GET  /v2/health/live, /v2/health/ready   (KServe V2 health)
    GET  /metrics                        Prometheus text: requests, texts, batch sizes, latency, queue

Each bundle has one `Batcher`: texts of concurrent requests (of any of the
bundle's tasks: a merged bundle runs them in one graph) wait at most
`max_wait` for a batch of `max_batch`, then run together on one worker
thread while the event loop keeps reading requests.  A row's result does not
depend on the batch it ran in (the graph is row-independent; tests hold it
to 1e-5).  Errors are JSON {"error": "..."} with a 4xx status naming the
problem; the server keeps serving.  SIGTERM: uvicorn stops accepting, the
requests in flight are answered, then the process exits.

This module imports uvicorn (the `serve` extra) only in `run`; the app is
plain ASGI.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .bundle import batched_logits, prediction
from .errors import InputError
from .inputs import check_text, lone_surrogate


@dataclass(frozen=True)
class Limits:
    max_batch: int = 64  # texts gathered from concurrent requests
    group: int = 16  # texts per model call: a gathered batch runs in length-sorted groups of this size
    max_wait: float = 0.002  # seconds the first text of a batch waits for more
    max_body: int = 1 << 20  # request bytes
    max_texts: int = 256  # instances per request
    max_chars: int = 20000  # characters per text (tokens past the bundle's max_length are cut anyway)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Metrics:
    """Counters and histograms, written out in Prometheus' text format."""

    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

    def __init__(self):
        self.requests = {}  # (task, status) -> count
        self.texts = {}  # task -> count
        self.batch_sizes = [0] * (len(self.BATCH_BUCKETS) + 1)
        self.batch_total = 0
        self.batch_count = 0
        self.latency = [0] * (len(self.LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.queued = 0

    def request(self, task: str, status: int, seconds: float, texts: int) -> None:
        self.requests[(task, status)] = self.requests.get((task, status), 0) + 1
        if status == 200:
            self.texts[task] = self.texts.get(task, 0) + texts
            self.latency[bucket(self.LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def batch(self, size: int) -> None:
        self.batch_sizes[bucket(self.BATCH_BUCKETS, size)] += 1
        self.batch_total += size
        self.batch_count += 1

    def text(self) -> str:
        out = ["# TYPE ptbundle_requests_total counter"]
        out += [f'ptbundle_requests_total{{task="{t}",code="{c}"}} {n}' for (t, c), n in sorted(self.requests.items())]
        out += ["# TYPE ptbundle_texts_total counter"]
        out += [f'ptbundle_texts_total{{task="{t}"}} {n}' for t, n in sorted(self.texts.items())]
        out += histogram("ptbundle_batch_size", self.BATCH_BUCKETS, self.batch_sizes, self.batch_total)
        out += histogram("ptbundle_request_seconds", self.LATENCY_BUCKETS, self.latency, self.latency_sum)
        out += ["# TYPE ptbundle_queued_texts gauge", f"ptbundle_queued_texts {self.queued}"]
        return "\n".join(out) + "\n"


def bucket(bounds, value) -> int:
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def histogram(name: str, bounds, counts, total) -> list:
    out, running = [f"# TYPE {name} histogram"], 0
    for b, n in zip((*bounds, math.inf), counts):
        running += n
        out.append(f'{name}_bucket{{le="{"+Inf" if b == math.inf else b}"}} {running}')
    return out + [f"{name}_sum {total}", f"{name}_count {running}"]


class Batcher:
    """Collects (encoding, task index) rows of concurrent requests into batches for one bundle's model."""

    def __init__(self, bundle, limits: Limits, metrics: Metrics):
        self.bundle, self.limits, self.metrics = bundle, limits, metrics
        self.queue = deque()  # (encoding, task index, future)
        self.ready = asyncio.Event()
        # One thread runs the model (onnxruntime uses every core inside each call);
        # the event loop stays free to read and answer requests meanwhile.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ptbundle-batch")
        self.task = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.worker.shutdown(wait=True)

    async def logits(self, encodings, task_index: int) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in encodings]
        self.queue.extend((e, task_index, f) for e, f in zip(encodings, futures))
        self.metrics.queued = len(self.queue)
        self.ready.set()
        return await asyncio.gather(*futures)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.ready.clear()
                await self.ready.wait()
            if len(self.queue) < self.limits.max_batch and self.limits.max_wait > 0:
                await asyncio.sleep(self.limits.max_wait)  # let a batch gather
            rows = [self.queue.popleft() for _ in range(min(self.limits.max_batch, len(self.queue)))]
            self.metrics.queued = len(self.queue)
            self.metrics.batch(len(rows))
            try:
                logits = await loop.run_in_executor(self.worker, self.compute, rows)
            except Exception as e:  # a failing model call fails its rows' requests, not the server
                for _, _, f in rows:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, _, f), row in zip(rows, logits):
                if not f.done():  # a request whose client went away may have been cancelled
                    f.set_result(row)

    def compute(self, rows) -> np.ndarray:
        """Logits of the rows, in their order.  The rows run in length order, `group` at a time: on CPU a
        sentence alone costs about what it costs in a batch (docs/measured.md, "Merging, serving, streaming"), so a batch
        of mixed lengths padded to its longest would be slower than the same rows in groups of similar length."""
        manifest = self.bundle.manifest
        tasks = np.array([t for _, t, _ in rows], np.int32) if manifest.multi_task else None
        width = max(len(t.labels) for t in manifest.tasks)
        return batched_logits(self.bundle.model, [e for e, _, _ in rows], manifest.pad_id, width, self.limits.group,
                              True, tasks)


@dataclass(frozen=True)
class Endpoint:
    """One served task: the bundle that holds it, its name there, its batcher."""

    bundle: object
    path: str
    task: str  # the task's name inside the bundle
    batcher: Batcher


class App:
    """The ASGI application."""

    def __init__(self, bundles: dict, limits: Limits = Limits(), announce=None):
        # bundles: served name -> (Bundle, path, task name in the bundle)
        self.limits, self.metrics, self.announce = limits, Metrics(), announce
        self.bundles = bundles
        self.endpoints = {}
        self.ready = False

    async def startup(self) -> None:
        batchers = {}
        for name, (bundle, path, task) in self.bundles.items():
            if id(bundle) not in batchers:
                batchers[id(bundle)] = Batcher(bundle, self.limits, self.metrics)
                batchers[id(bundle)].start()
            self.endpoints[name] = Endpoint(bundle, path, task, batchers[id(bundle)])
        self.batchers = list(batchers.values())
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
        task, texts = "-", 0
        try:
            status, body, task, texts = await self.route(scope, receive)
        except RequestError as e:
            status, body = e.status, {"error": str(e)}
        except Exception as e:  # a bug must not take the server down: answer 500 and say what
            print(f"pt-run serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            status, body = 500, {"error": f"internal error ({type(e).__name__})"}
        if isinstance(body, str):
            payload, kind = body.encode(), b"text/plain; version=0.0.4"
        else:
            payload, kind = json_bytes(body), b"application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(payload)).encode())]})
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
        if path == "/metrics":
            need(method == "GET", 405, "/metrics takes GET")
            return 200, self.metrics.text(), "-", 0
        if path == "/v1/models":
            need(method == "GET", 405, "/v1/models takes GET")
            return 200, {"models": list(self.endpoints)}, "-", 0
        if path.startswith("/v1/models/"):
            name, _, verb = path[len("/v1/models/"):].partition(":")
            endpoint = self.endpoints.get(name)
            need(endpoint is not None, 404, f"no task {name!r} (tasks: {', '.join(self.endpoints)})")
            if verb == "":
                need(method == "GET", 405, f"{path} takes GET")
                spec = endpoint.bundle.manifest.task(endpoint.task)
                return 200, {"name": name, "ready": self.ready, "labels": list(spec.labels), "pair": spec.pair,
                             "bundle": endpoint.path}, "-", 0
            need(verb == "predict", 404, f"unknown verb {verb!r} (use {name}:predict)")
            need(method == "POST", 405, f"{path} takes POST")
            body = await read_body(receive, self.limits.max_body)
            predictions = await self.predict(endpoint, body)
            return 200, {"predictions": predictions}, name, len(predictions)
        raise RequestError(404, f"no route {path} (see /v1/models)")

    async def predict(self, endpoint: Endpoint, body: bytes) -> list:
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON ({e})") from None
        except RecursionError:  # json's parser recurses once per level: thousands of [[[... exhaust the stack
            raise RequestError(400, "request body is nested too deeply (arrays or objects inside each other)"
                               ) from None
        bad = surrogate_in(request)
        need(bad is None, 400, f"request body is not valid Unicode: {bad}")
        spec = endpoint.bundle.manifest.task(endpoint.task)
        texts, texts_b = parse_instances(request, spec.pair, self.limits)
        try:
            encodings = endpoint.bundle.encode(texts, texts_b if spec.pair else None, endpoint.task)
        except InputError as e:
            raise RequestError(422, str(e)) from None
        runner = endpoint.bundle.tasks[endpoint.task]
        rows = await endpoint.batcher.logits(encodings, runner.index)
        return [prediction(spec.labels, row).to_dict() for row in rows]


def json_bytes(body) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a message quoting a lone surrogate: escaped, it is still valid JSON
        return json.dumps(body).encode()


def surrogate_in(value) -> str | None:
    """Where a parsed JSON value holds a lone surrogate (JSON lets "\\ud83d" stand alone; text cannot), as
    'instances[0].text holds ...', or None.  Iterative: the value nests as deep as the parser allowed."""
    todo = deque([(value, "")])
    while todo:
        value, where = todo.popleft()
        if isinstance(value, str):
            bad = lone_surrogate(value)
            if bad:
                return f"{where or 'the body'} holds a lone surrogate ({bad})"
        elif isinstance(value, dict):
            for key, item in value.items():
                bad = lone_surrogate(key)
                if bad:
                    return f"a key of {where or 'the body'} holds a lone surrogate ({bad})"
                todo.append((item, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            todo.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
    return None


def need(ok: bool, status: int, message: str) -> None:
    if not ok:
        raise RequestError(status, message)


async def read_body(receive, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "client disconnected before the body was sent")
        chunk = message.get("body", b"")
        size += len(chunk)
        need(size <= limit, 413, f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def parse_instances(request, pair: bool, limits: Limits) -> tuple:
    """{"instances": [...]} -> (texts, texts_b); 422 naming the instance and field of anything wrong."""
    need(isinstance(request, dict), 422, "request must be a JSON object with \"instances\"")
    unknown = set(request) - {"instances"}
    need(not unknown, 422, f"unknown field(s) {', '.join(sorted(unknown))} (the request has \"instances\")")
    instances = request.get("instances")
    need(isinstance(instances, list), 422, "\"instances\" must be a list of texts")
    need(len(instances) > 0, 422, "\"instances\" is empty")
    need(len(instances) <= limits.max_texts, 413, f"{len(instances)} instances; at most {limits.max_texts} a request")
    texts, texts_b = [], []
    for i, item in enumerate(instances):
        where = f"instances[{i}]"
        if isinstance(item, str) and not pair:
            item = {"text": item}
        need(isinstance(item, dict), 422, f"{where} must be " + ("an object with \"text\" and \"text_b\" (a pair task)"
                                                               if pair else "a string or an object with \"text\""))
        extra = set(item) - {"text", "text_b"}
        need(not extra, 422, f"{where}: unknown field(s) {', '.join(sorted(extra))}")
        fields = ("text", "text_b") if pair else ("text",)
        if not pair:
            need("text_b" not in item, 422, f"{where}.text_b: this task takes one text")
        for field in fields:
            need(field in item, 422, f"{where}.{field} is missing" + (" (a sentence-pair task)" if pair else ""))
            problem = check_text(item[field], f"{where}.{field}")
            need(problem is None, 422, problem or "")
            need(len(item[field]) <= limits.max_chars, 413,
                 f"{where}.{field}: {len(item[field])} characters; at most {limits.max_chars}")
        texts.append(item["text"])
        texts_b.append(item.get("text_b"))
    return texts, texts_b


def endpoints_of(specs: list, bundles: list) -> dict:
    """Served name -> (Bundle, path, task): a one-task bundle under its directory's name (or NAME=), each task of a
    merged bundle under its own name."""
    out = {}
    for (name, path), bundle in zip(specs, bundles):
        if bundle.manifest.generative:  # refused at start: its every :predict would fail
            raise InputError(f"{path}: a generation bundle: pt-run serve serves classifiers (:predict answers"
                             f" labels); generate with it by pt-run generate or Bundle.generate")
        if bundle.manifest.multi_task:
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


def run(bundles: dict, host: str, port: int, limits: Limits, log) -> None:
    """Serve until SIGTERM or Ctrl-C (uvicorn answers the requests in flight first)."""
    import socket

    try:
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
        log(f"pt-run serve: listening on http://{where}:{bound} (tasks: {', '.join(bundles)}; max batch"
            f" {limits.max_batch}, max wait {limits.max_wait * 1000:g} ms)")

    app = App(bundles, limits, announce)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])
