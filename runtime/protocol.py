"""The wire formats of `pt-run serve` (runtime.serve), apart from the server's state: KServe V1 requests
(`parse_instances`), the Open Inference Protocol's (V2) with Triton's binary tensor data extension
(`parse_v2_inputs`, `parse_v2_outputs`, `v2_answer`, `v2_metadata`), the request body read within its limit,
and the errors they answer with (`RequestError`: a 4xx status and one line naming the field).
"""

from __future__ import annotations

import json
import struct
from collections import deque
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from .inputs import check_text, lone_surrogate


@dataclass(frozen=True)
class Limits:
    max_batch: int = 64  # texts gathered from concurrent requests
    group: int = 16  # texts per model call: a gathered batch runs in length-sorted groups of this size
    max_wait: float = 0.002  # seconds the first text of a batch waits for more
    max_body: int = 1 << 20  # request bytes
    max_texts: int = 256  # instances per request
    max_chars: int = 20000  # characters per text (tokens past the bundle's max_length are cut anyway)


@dataclass(frozen=True)
class Reply:
    """An answer that is not plain JSON: a V2 JSON header followed by binary tensors."""

    payload: bytes
    kind: bytes
    headers: tuple = ()


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_json(body: bytes):
    """The parsed request body; 400 if it is not JSON or holds a lone surrogate."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON ({e})") from None
    except RecursionError:  # json's parser recurses once per level: thousands of [[[... exhaust the stack
        raise RequestError(400, "request body is nested too deeply (arrays or objects inside each other)") from None
    bad = surrogate_in(request)
    need(bad is None, 400, f"request body is not valid Unicode: {bad}")
    return request


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


def package_version() -> str:
    try:
        return version("ptbundle")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


VERSION = package_version()
# Triton's binary tensor data: tritonclient sends and asks for tensors as raw bytes after the JSON unless told not to.
V2_EXTENSIONS = ("binary_tensor_data",)
V2_OUTPUTS = ("label", "probabilities")


def v2_metadata(name: str, labels, pair: bool, platform: str) -> dict:
    """Model metadata: BYTES texts in (text_b too for a pair task), labels and probabilities out (columns in the
    order of /v1/models/NAME's "labels")."""
    inputs = ["text", "text_b"] if pair else ["text"]
    return {"name": name, "platform": platform,  # no "versions": a task has one
            "inputs": [{"name": i, "datatype": "BYTES", "shape": [-1]} for i in inputs],
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)]}]}


def header_length(scope) -> int | None:
    """The binary extension's Inference-Header-Content-Length: how many leading body bytes are JSON."""
    value = dict(scope["headers"]).get(b"inference-header-content-length")
    if value is None:
        return None
    need(value.isdigit(), 400, f"Inference-Header-Content-Length {value.decode('latin-1')!r} is not a byte count")
    return int(value)


def parse_v2_inputs(request, tail: bytes, pair: bool, limits: Limits) -> tuple:
    """A V2 request's inputs -> (texts, texts_b); 400 naming the input and field of anything wrong."""
    need(isinstance(request, dict), 400, "request must be a JSON object with \"inputs\"")
    unknown = set(request) - {"id", "parameters", "inputs", "outputs"}
    need(not unknown, 400, f"unknown field(s) {', '.join(sorted(unknown))} (the request has \"inputs\")")
    need(isinstance(request.get("id", ""), str), 400, "\"id\" must be a string")
    need(isinstance(request.get("parameters", {}), dict), 400, "\"parameters\" must be an object")
    inputs = request.get("inputs")
    need(isinstance(inputs, list) and inputs, 400, "\"inputs\" must be a non-empty list of tensors")
    wanted = ("text", "text_b") if pair else ("text",)
    tensors = {}
    for i, tensor in enumerate(inputs):
        need(isinstance(tensor, dict), 400, f"inputs[{i}] must be an object with name, datatype, shape and data")
        name = tensor.get("name")
        need(name in wanted, 400, f"inputs[{i}]: unknown input {name!r} (this model takes {', '.join(wanted)})")
        need(name not in tensors, 400, f"inputs[{i}]: input {name!r} given twice")
        tensors[name], tail = tensor_texts(tensor, name, tail, limits)
    need(not tail, 400, f"{len(tail)} bytes of binary data after the tensors' (binary_data_size too small?)")
    for name in wanted:
        need(name in tensors, 400, f"input {name!r} is missing" + (" (a sentence-pair task)" if pair else ""))
    texts = tensors["text"]
    if pair:
        need(len(tensors["text_b"]) == len(texts), 400,
             f"text has {len(texts)} elements and text_b {len(tensors['text_b'])}: one text_b a text")
    return texts, tensors.get("text_b", [None] * len(texts))


def tensor_texts(tensor: dict, name: str, tail: bytes, limits: Limits) -> tuple:
    """One BYTES input -> (its texts, the binary data after its own)."""
    extra = set(tensor) - {"name", "datatype", "shape", "parameters", "data"}
    need(not extra, 400, f"input {name}: unknown field(s) {', '.join(sorted(extra))}")
    need(tensor.get("datatype") == "BYTES", 400, f"input {name}: datatype {tensor.get('datatype')!r}; texts are BYTES")
    shape = tensor.get("shape")
    need(isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 1, 400,
         f"input {name}: shape {shape!r}; a list of texts has shape [n], n >= 1")
    need(shape[0] <= limits.max_texts, 413, f"input {name}: {shape[0]} texts; at most {limits.max_texts} a request")
    parameters = tensor.get("parameters", {})
    need(isinstance(parameters, dict), 400, f"input {name}: \"parameters\" must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        need(type(size) is int and 0 <= size <= len(tail), 400,
             f"input {name}: binary_data_size {size!r}; {len(tail)} bytes follow the JSON")
        need("data" not in tensor, 400, f"input {name}: both \"data\" and binary_data_size")
        data, tail = unpack_bytes(tail[:size], name), tail[size:]
    else:
        data = tensor.get("data")
        need(isinstance(data, list), 400, f"input {name}: \"data\" must be a list of strings")
    need(len(data) == shape[0], 400, f"input {name}: shape [{shape[0]}] but {len(data)} elements")
    for i, text in enumerate(data):
        problem = check_text(text, f"input {name}[{i}]")
        need(problem is None, 400, problem or "")
        need(len(text) <= limits.max_chars, 413,
             f"input {name}[{i}]: {len(text)} characters; at most {limits.max_chars}")
    return data, tail


def unpack_bytes(raw: bytes, name: str) -> list:
    """Triton's binary BYTES tensor: each element a 4-byte little-endian length and that many UTF-8 bytes."""
    out, at = [], 0
    while at < len(raw):
        need(at + 4 <= len(raw), 400, f"input {name}: binary data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, at)
        need(at + 4 + size <= len(raw), 400, f"input {name}: binary element {len(out)} runs past its data")
        try:
            out.append(raw[at + 4:at + 4 + size].decode())
        except UnicodeDecodeError as e:
            raise RequestError(400, f"input {name}[{len(out)}]: not UTF-8 text ({e.reason} at byte {e.start})"
                               ) from None
        at += 4 + size
    return out


def parse_v2_outputs(request: dict) -> list:
    """[(output name, binary?)] the request asks for: all outputs when it names none (binary if its
    "binary_data_output" parameter says so)."""
    binary = request.get("parameters", {}).get("binary_data_output", False) is True
    outputs = request.get("outputs")
    if outputs is None:
        return [(name, binary) for name in V2_OUTPUTS]
    need(isinstance(outputs, list) and outputs, 400, "\"outputs\" must be a non-empty list of {\"name\": ...}")
    out = []
    for i, o in enumerate(outputs):
        need(isinstance(o, dict) and o.get("name") in V2_OUTPUTS, 400,
             f"outputs[{i}]: unknown output {o.get('name') if isinstance(o, dict) else o!r}"
             f" (outputs: {', '.join(V2_OUTPUTS)})")
        parameters = o.get("parameters", {})
        need(isinstance(parameters, dict), 400, f"outputs[{i}]: \"parameters\" must be an object")
        out.append((o["name"], parameters.get("binary_data", False) is True))
    return out


def v2_answer(name: str, request_id, outputs: list, labels, predictions: list):
    """The infer response: JSON, or a Reply with the binary outputs after the JSON when any were asked for so."""
    n = len(predictions)
    values = {"label": ("BYTES", [n], [p.label for p in predictions]),
              "probabilities": ("FP32", [n, len(labels)],
                                np.array([[p.probabilities[l] for l in labels] for p in predictions], np.float32))}
    tensors, blobs = [], []
    for output, binary in outputs:
        datatype, shape, data = values[output]
        tensor = {"name": output, "datatype": datatype, "shape": shape}
        if binary:
            blobs.append(pack_bytes(data) if datatype == "BYTES" else data.astype("<f4").tobytes())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = data if datatype == "BYTES" else data.ravel().tolist()
        tensors.append(tensor)
    body = {"model_name": name, **({"id": request_id} if request_id is not None else {}), "outputs": tensors}
    if not blobs:
        return body
    head = json_bytes(body)
    return Reply(head + b"".join(blobs), b"application/octet-stream",
                 ((b"inference-header-content-length", str(len(head)).encode()),))


def pack_bytes(texts: list) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (t.encode() for t in texts))
