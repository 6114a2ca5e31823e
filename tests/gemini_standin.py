"""A local stand-in of the Gemini REST API, for tests and benchmarks: a FAKE, because Google's
endpoint cannot run here. The real google-genai SDK talks to it through DYLEN_GEMINI_BASE_URL.

    python -m tests.gemini_standin --port 8931 --key test-key [--latency 1.0] [--rate-429 0.1]

It answers `POST /{version}/models/{model}:generateContent` (the API key in `x-goog-api-key`, as
the SDK sends it) with a reply that fits the request's `generationConfig.responseJsonSchema`, and
`usageMetadata` (about 4 characters a token). It counts every call (arrival, end, status, tokens),
and scripts the provider's behaviours:

- globally (`--latency`, `--rate-429`, `--retry-delay`, or POST /_standin/config with the same
  names): a delay before each answer; a share of calls answered 429 RESOURCE_EXHAUSTED with a
  google.rpc.RetryInfo detail;
- per request, by a directive in its text (a lesson's topic carries it into every prompt):
  `[standin:malformed]` JSON that does not parse, except in a repair (a conversation with a model
  turn); `[standin:malformed-always]` also in repairs; `[standin:safety]` the prompt blocked
  (promptFeedback.blockReason SAFETY, no candidates); `[standin:429-once]` / `[standin:500-once]`
  the first time a given request is seen; `[standin:400]` 400 INVALID_ARGUMENT (a request the API
  refuses); `[standin:slow=<s>]` a delay. `[standin:<what>:plan]` or
  `:section` limits a directive to plan calls (their schema has `sections`) or section calls.

A `[run:<id>]` in a request's text is recorded with the call (`run`), so that tests sharing one
stand-in count their own calls. GET /_standin/stats returns the calls; POST /_standin/reset forgets
them. `StandIn` starts one as a process of its own and reads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_ROUTE = re.compile(r"^/(v1beta|v1|v1alpha)/models/([A-Za-z0-9._-]+):generateContent$")
_DIRECTIVE = re.compile(r"\[standin:([a-z0-9-]+)(?::(plan|section))?(?:=([\d.]+))?\]")
_RUN = re.compile(r"\[run:([A-Za-z0-9-]+)\]")


class State:
    def __init__(self, key: str, latency: float, rate_429: float, retry_delay: float, seed: int) -> None:
        self.key = key
        self.latency = latency
        self.rate_429 = rate_429
        self.retry_delay = retry_delay
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0

    def configure(self, values: dict[str, Any]) -> None:
        with self.lock:
            for name in ("latency", "rate_429", "retry_delay"):
                if name in values:
                    setattr(self, name, float(values[name]))
            if "seed" in values:
                self.random = random.Random(int(values["seed"]))

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.seen.clear()
            self.max_in_flight = 0


def _instance(schema: dict[str, Any], path: str, counter: list[int]) -> Any:
    """A value that fits `schema` (the subset of JSON Schema the generators send)."""
    kind = schema.get("type")
    if kind == "object":
        return {
            name: _instance(sub, f"{path}.{name}", counter)
            for name, sub in schema.get("properties", {}).items()
        }
    if kind == "array":
        count = max(schema.get("minItems", 1), 1)
        if "maxItems" in schema:
            count = min(count, schema["maxItems"])
        return [
            _instance(schema.get("items", {"type": "string"}), f"{path}[{i}]", counter) for i in range(count)
        ]
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return True
    counter[0] += 1
    text = f"Stand-in text {counter[0]} for {path.lstrip('.') or 'reply'}."
    return text[: schema["maxLength"]] if "maxLength" in schema else text


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the stats say what happened
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_GET(self) -> None:
        state = self.server.state
        if self.path.startswith("/_standin/stats"):
            with state.lock:
                self._send(200, {"calls": list(state.calls), "max_in_flight": state.max_in_flight})
            return
        self._send(404, {"error": {"code": 404, "message": "Not found", "status": "NOT_FOUND"}})

    def do_POST(self) -> None:
        state = self.server.state
        if self.path == "/_standin/config":
            state.configure(self._body())
            self._send(200, {"ok": True})
            return
        if self.path == "/_standin/reset":
            state.reset()
            self._send(200, {"ok": True})
            return
        route = _ROUTE.match(self.path.split("?", 1)[0])
        if route is None:
            self._send(
                404, {"error": {"code": 404, "message": f"No route {self.path}", "status": "NOT_FOUND"}}
            )
            return
        arrived = time.time()
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            status, body, record = self._generate(route.group(2), self._body())
        finally:
            with state.lock:
                state.in_flight -= 1
        with state.lock:
            state.calls.append(
                {
                    "arrived": arrived,
                    "ended": time.time(),
                    "model": route.group(2),
                    "status": status,
                    **record,
                }
            )
        self._send(status, body)

    def _generate(self, model: str, request: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, Any]]:
        state = self.server.state
        contents = request.get("contents") or []
        texts = [p.get("text", "") for c in contents for p in c.get("parts", [])]
        run = _RUN.search(" ".join(texts))
        record: dict[str, Any] = {
            "kind": None,
            "input_tokens": 0,
            "output_tokens": 0,
            "run": run and run.group(1),
        }
        if self.headers.get("x-goog-api-key") != state.key:
            return (
                400,
                _error(400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT"),
                record,
            )
        system = " ".join(
            p.get("text", "") for p in (request.get("systemInstruction") or {}).get("parts", [])
        )
        config = request.get("generationConfig") or {}
        schema = config.get("responseJsonSchema") or config.get("responseSchema") or {"type": "string"}
        repair = any(c.get("role") == "model" for c in contents)
        kind = "repair" if repair else ("plan" if "sections" in schema.get("properties", {}) else "section")
        record["kind"] = kind
        record["schema_sent"] = (
            "responseJsonSchema" in config and config.get("responseMimeType") == "application/json"
        )
        step = "plan" if "sections" in schema.get("properties", {}) else "section"
        directives = {
            name: value
            for name, applies_to, value in _DIRECTIVE.findall(" ".join(texts))
            if not applies_to or applies_to == step
        }
        fingerprint = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        with state.lock:
            first_time = fingerprint not in state.seen
            state.seen.add(fingerprint)
            limited = state.rate_429 > 0 and state.random.random() < state.rate_429
            latency, retry_delay = state.latency, state.retry_delay
        time.sleep(latency + float(directives.get("slow") or 0))
        if limited or ("429-once" in directives and first_time):
            record["kind"] = f"{kind}:429"
            return 429, _rate_limited(retry_delay), record
        if "400" in directives:
            return 400, _error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT"), record
        if "500-once" in directives and first_time:
            return 500, _error(500, "An internal error has occurred.", "INTERNAL"), record
        input_tokens = _tokens(system + "".join(texts))
        record["input_tokens"] = input_tokens
        if "safety" in directives:
            return (
                200,
                {
                    "promptFeedback": {"blockReason": "SAFETY"},
                    "usageMetadata": {"promptTokenCount": input_tokens, "totalTokenCount": input_tokens},
                    "modelVersion": model,
                },
                record,
            )
        if "malformed-always" in directives or ("malformed" in directives and not repair):
            reply = '{"title": "Stand-in", "sections": [{"heading": '  # cut off: not JSON
        else:
            reply = json.dumps(_instance(schema, "", [0]))
        output_tokens = _tokens(reply)
        record["output_tokens"] = output_tokens
        return (
            200,
            {
                "candidates": [
                    {
                        "content": {"role": "model", "parts": [{"text": reply}]},
                        "finishReason": "STOP",
                        "index": 0,
                    }
                ],
                "usageMetadata": {
                    "promptTokenCount": input_tokens,
                    "candidatesTokenCount": output_tokens,
                    "totalTokenCount": input_tokens + output_tokens,
                },
                "modelVersion": model,
            },
            record,
        )


def _error(code: int, message: str, status: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


def _rate_limited(delay: float) -> dict[str, Any]:
    body = _error(
        429,
        "You exceeded your current quota, please check your plan and billing details.",
        "RESOURCE_EXHAUSTED",
    )
    body["error"]["details"] = [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay:g}s"},
    ]
    return body


class StandIn:
    """The stand-in as a process of its own (tests, benchmarks), and its control endpoints."""

    def __init__(self, port: int, key: str, **options: float) -> None:
        self.port = port
        self.key = key
        self.url = f"http://127.0.0.1:{port}"
        args = [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gemini_standin", f"--port={port}", f"--key={key}", *args],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the Gemini stand-in did not start") from None
                time.sleep(0.05)

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
        with opener.open(request, timeout=10) as response:
            return json.loads(response.read())

    def calls(self, *, run: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
        """The calls seen so far (of one run, or one model), in arrival order."""
        calls = self._request("GET", "/_standin/stats")["calls"]
        calls = [
            c for c in calls if (run is None or c["run"] == run) and (model is None or c["model"] == model)
        ]
        return sorted(calls, key=lambda c: c["arrived"])

    def max_in_flight(self) -> int:
        return int(self._request("GET", "/_standin/stats")["max_in_flight"])

    def configure(self, **values: float) -> None:
        self._request("POST", "/_standin/config", values)

    def reset(self) -> None:
        self._request("POST", "/_standin/reset", {})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def most_in_any_window(times: list[float], window: float) -> int:
    """The most of `times` (seconds) that fall in any half-open interval `window` long."""
    times = sorted(times)
    most = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, state: State) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.state = state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--retry-delay", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=23)
    args = parser.parse_args()
    server = Server(args.port, State(args.key, args.latency, args.rate_429, args.retry_delay, args.seed))
    print(f"gemini stand-in on http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
