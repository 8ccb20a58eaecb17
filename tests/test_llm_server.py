"""The scripted test server run in a child process (``ScriptedLLMServerProcess``), as the benchmarks use it."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from llm_server import Reply, ScriptedLLMServerProcess


def _chat(base_url: str, content: str) -> str:
    body = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": content}]}).encode()
    request = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_server_process_answers_counts_and_resets() -> None:
    with ScriptedLLMServerProcess(Reply, text="from the child", delay_s=0.3) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: _chat(server.base_url, f"q{i}"), range(4)))
        assert answers == ["from the child"] * 4
        assert time.monotonic() - start < 4 * 0.3  # answered concurrently, not one after another
        stats = server.stats()
        assert stats["chat_requests"] == 4 and stats["max_in_flight"] == 4 and stats["errors"] == []
        server.reset()
        assert server.stats()["chat_requests"] == 0
    assert server._process is None  # stopped and joined


def test_server_process_that_cannot_build_its_handler_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="exited"):
        ScriptedLLMServerProcess(Reply, no_such_field=1).start()  # TypeError in the child
