"""A real OpenAI-compatible HTTP server for tests, with scripted answers (no network: 127.0.0.1, port 0).

Usage::

    from llm_server import Reply, ScriptedLLMServer   # pytest puts tests/ on sys.path (no __init__.py)

    def handler(request: dict) -> Reply | str:
        # `request` is the parsed JSON body of POST /v1/chat/completions
        last = request["messages"][-1]["content"]
        return Reply(text="[EXPLANATION]: numbers", delay_s=0.05)

    with ScriptedLLMServer(handler) as server:
        provider = make_provider("openai", base_url=server.base_url, model="test-model")
        ...
        assert len(server.requests) == 3
        assert server.max_in_flight == 4

What a script may be (the ``handler`` argument):

- a callable ``(request_json: dict) -> Reply | str`` (a ``str`` is ``Reply(text=...)``); it runs on the
  server's request thread, so it may block; an exception inside it becomes a 500 answer;
- a ``Reply`` or ``str``: the same answer to every request;
- a list / iterable of ``Reply`` or ``str``: answered in order, one per request (a request past the end
  gets a 500 with ``"script exhausted"`` and is counted in ``server.errors``).

``Reply`` fields: ``text`` (the assistant message), ``status`` (HTTP status; non-200 sends an OpenAI-style
error body unless ``body`` is given), ``headers`` (extra response headers, e.g. ``{"Retry-After": "1"}``),
``delay_s`` (sleep before answering: slow answers and timeouts), ``logprobs`` (per generated token: a list of
``{"token": str, "logprob": float, "top_logprobs": {token: logprob} | [{"token", "logprob"}]}``, sent as
OpenAI's ``choices[0].logprobs.content``), ``body`` (raw ``str``/``bytes``/``dict`` body sent as is, for
malformed answers), ``prompt_tokens`` / ``completion_tokens`` (usage; default: whitespace word counts),
``finish_reason``, ``drop`` (close the connection without answering).

:class:`ScriptedLLMServerProcess` runs the same server in a child process (its own interpreter and GIL), for
benchmarks where the server must not compete with the client for CPU: ``ScriptedLLMServerProcess(factory,
*args, **kwargs)`` builds the handler as ``factory(*args, **kwargs)`` in the child (``factory`` must be importable there: a
module-level class or function); it exposes ``base_url``, ``reset()`` and ``stats()`` (request counts,
``max_in_flight``, ``errors``), not the recorded requests themselves.

Server attributes: ``base_url`` (``http://127.0.0.1:PORT/v1``), ``requests`` (list of
:class:`RecordedRequest`: ``method``, ``path``, ``headers`` (lower-case keys), ``body`` (parsed JSON or None),
``raw`` bytes, ``started``/``finished`` monotonic times), ``chat_requests`` (only the chat completions),
``max_in_flight`` (the most chat requests being handled at the same moment), ``in_flight``, ``errors``
(server-side problems: script exhausted, handler exceptions), ``reset()`` (clears records and counters).
``GET /v1/models`` lists ``models`` (default ``["test-model"]``).
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["RecordedRequest", "Reply", "ScriptedLLMServer", "ScriptedLLMServerProcess", "word_count"]


def word_count(text: str) -> int:
    """Deterministic stand-in for a tokenizer: the number of whitespace-separated words."""
    return len(text.split())


@dataclass
class Reply:
    """One scripted answer of the server."""

    text: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    logprobs: list[dict[str, Any]] | None = None
    body: str | bytes | dict[str, Any] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = "stop"
    drop: bool = False


@dataclass
class RecordedRequest:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes
    started: float
    finished: float | None = None


def _logprobs_content(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        tops = entry.get("top_logprobs") or []
        if isinstance(tops, dict):
            tops = [{"token": t, "logprob": lp} for t, lp in tops.items()]
        out.append({
            "token": entry["token"],
            "logprob": entry["logprob"],
            "bytes": list(entry["token"].encode()),
            "top_logprobs": [
                {"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode())} for t in tops
            ],
        })
    return out


def _prompt_words(request: Any) -> int:
    if not isinstance(request, dict):
        return 0
    total = 0
    for message in request.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += word_count(content)
    return total


class ScriptedLLMServer:
    """Threaded OpenAI-compatible server on 127.0.0.1 answering from a script; a context manager."""

    def __init__(
        self,
        handler: Callable[[dict[str, Any]], Reply | str] | Reply | str | Iterable[Reply | str],
        models: Iterable[str] = ("test-model",),
    ):
        self.models = list(models)
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._script: Callable[[dict[str, Any]], Reply | str]
        if callable(handler):
            self._script = handler
        elif isinstance(handler, (Reply, str)):
            fixed = handler
            self._script = lambda _request: fixed
        else:
            queue: Iterator[Reply | str] = iter(list(handler))
            queue_lock = threading.Lock()

            def from_queue(_request: dict[str, Any]) -> Reply | str:
                with queue_lock:
                    try:
                        return next(queue)
                    except StopIteration:
                        raise LookupError("script exhausted") from None

            self._script = from_queue
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ScriptedLLMServer:
        """Bind to a free port and serve in a background thread."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body are two writes: with Nagle on, the body waits for the client's delayed ACK (~40 ms)
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                server._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                server._handle(self, "POST")

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default listen backlog (5) drops bursts of concurrent connections

            def handle_error(self, request: Any, client_address: Any) -> None:
                # a client that closes its connection is normal (a run ending); anything else is reported
                # as server-side errors instead of a traceback on the test process's stderr
                error = sys.exc_info()[1]
                if not isinstance(error, ConnectionError):
                    server.errors.append(f"{type(error).__name__}: {error}")

        httpd = Server(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; handlers still sleeping in ``delay_s`` are woken and dropped."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ScriptedLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """Recorded ``POST .../chat/completions`` requests, in arrival order."""
        return [r for r in self.requests if r.method == "POST" and r.path.rstrip("/").endswith("chat/completions")]

    def reset(self) -> None:
        """Forget recorded requests, errors and the in-flight maximum."""
        with self._lock:
            self.requests.clear()
            self.errors.clear()
            self.max_in_flight = self.in_flight

    # ------------------------------------------------------------------ request handling

    def _handle(self, http: BaseHTTPRequestHandler, method: str) -> None:
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = RecordedRequest(
            method=method,
            path=http.path,
            headers={k.lower(): v for k, v in http.headers.items()},
            body=body,
            raw=raw,
            started=time.monotonic(),
        )
        path = http.path.split("?")[0].rstrip("/")
        is_chat = method == "POST" and path.endswith("/chat/completions")
        with self._lock:
            self.requests.append(record)
            if is_chat:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if method == "GET" and path.endswith("/models"):
                data = {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"} for m in self.models]}
                self._send(http, 200, json.dumps(data).encode(), {})
            elif is_chat:
                self._chat(http, body)
            else:
                self._send(http, 404, json.dumps({"error": {"message": f"no route {path}"}}).encode(), {})
        finally:
            with self._lock:
                record.finished = time.monotonic()
                if is_chat:
                    self.in_flight -= 1

    def _chat(self, http: BaseHTTPRequestHandler, request: Any) -> None:
        if not isinstance(request, dict):
            self._send(http, 400, json.dumps({"error": {"message": "body is not JSON"}}).encode(), {})
            return
        try:
            reply = self._script(request)
        except Exception as exc:
            with self._lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._send(http, 500, json.dumps({"error": {"message": f"script error: {exc}"}}).encode(), {})
            return
        if isinstance(reply, str):
            reply = Reply(text=reply)
        if reply.delay_s > 0 and self._stopping.wait(reply.delay_s):
            return
        if reply.drop:
            http.close_connection = True
            try:
                http.connection.shutdown(2)
            except OSError:
                pass
            return
        if reply.body is not None:
            raw = reply.body if isinstance(reply.body, bytes) else (
                reply.body.encode() if isinstance(reply.body, str) else json.dumps(reply.body).encode())
            self._send(http, reply.status, raw, reply.headers)
            return
        if reply.status != 200:
            error = {"error": {"message": f"scripted status {reply.status}", "type": "scripted", "code": reply.status}}
            self._send(http, reply.status, json.dumps(error).encode(), reply.headers)
            return
        prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else _prompt_words(request)
        completion_tokens = (reply.completion_tokens if reply.completion_tokens is not None
                             else word_count(reply.text))
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": reply.text},
            "finish_reason": reply.finish_reason,
            "logprobs": {"content": _logprobs_content(reply.logprobs)} if reply.logprobs is not None else None,
        }
        data = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "test-model"),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        self._send(http, 200, json.dumps(data).encode(), reply.headers)

    @staticmethod
    def _send(http: BaseHTTPRequestHandler, status: int, raw: bytes, headers: dict[str, str]) -> None:
        try:
            http.send_response(status)
            has_type = any(k.lower() == "content-type" for k in headers)
            if not has_type:
                http.send_header("Content-Type", "application/json")
            for key, value in headers.items():
                http.send_header(key, value)
            http.send_header("Content-Length", str(len(raw)))
            http.end_headers()
            http.wfile.write(raw)
            http.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)


def _serve_in_child(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], conn: Any) -> None:
    """Child-process side of :class:`ScriptedLLMServerProcess`: serve and answer commands on ``conn``."""
    with ScriptedLLMServer(factory(*args, **kwargs)) as server:
        conn.send(server.base_url)
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            if command == "stop":
                conn.send(None)
                return
            if command == "reset":
                server.reset()
                conn.send(None)
            elif command == "stats":
                with server._lock:
                    conn.send({"requests": len(server.requests), "chat_requests": len(server.chat_requests),
                               "max_in_flight": server.max_in_flight, "errors": list(server.errors)})


class ScriptedLLMServerProcess:
    """A :class:`ScriptedLLMServer` in a child process (spawned), so that it has its own GIL; a context manager.

    ``factory(*args, **kwargs)`` builds the handler in the child; ``factory`` is pickled by reference, so it must
    be a module-level callable importable in a fresh interpreter (``sys.path`` is passed on).
    """

    def __init__(self, factory: Callable[..., Any], *args: Any, start_timeout_s: float = 120.0, **kwargs: Any):
        self._factory = factory
        self._args = args
        self._kwargs = kwargs
        self._start_timeout_s = start_timeout_s
        self._process: Any = None
        self._conn: Any = None
        self.base_url = ""
        """OpenAI-style base URL of the child's server (set by :meth:`start`)."""

    def start(self) -> ScriptedLLMServerProcess:
        """Spawn the child and wait until it serves."""
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(target=_serve_in_child, args=(self._factory, self._args, self._kwargs, child), daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        if not parent.poll(self._start_timeout_s):
            self.stop()
            raise RuntimeError(f"scripted server process did not start within {self._start_timeout_s:g} s")
        try:
            self.base_url = parent.recv()
        except EOFError:
            self._process.join(5)
            code = self._process.exitcode
            self._conn = None
            self._process = None
            raise RuntimeError(f"scripted server process exited (code {code}) before serving") from None
        return self

    def _ask(self, command: str) -> Any:
        assert self._conn is not None, "server process not started"
        self._conn.send(command)
        return self._conn.recv()

    def reset(self) -> None:
        """Forget the child's recorded requests, errors and in-flight maximum."""
        self._ask("reset")

    def stats(self) -> dict[str, Any]:
        """``requests``, ``chat_requests`` (counts), ``max_in_flight`` and ``errors`` since the last reset."""
        return self._ask("stats")

    def stop(self) -> None:
        """Stop the server and join the child (terminated if it does not exit in 10 s)."""
        if self._conn is not None:
            try:
                self._ask("stop")
            except (EOFError, OSError):
                pass
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(10)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(5)
            self._process = None

    def __enter__(self) -> ScriptedLLMServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
