"""LLM providers against a real local OpenAI-compatible HTTP server (tests/llm_server.py), never the network."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import logging
import math
import socket
import sys
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import openai
import pytest
import saelab
from llm_server import Reply, ScriptedLLMServer
from saelab import hookimpl
from saelab.errors import UsageError
from saelab.llm import (
    Completion,
    LLMProvider,
    ProviderError,
    ResponseCache,
    TokenLogprob,
    TransientError,
    cache_key,
    check_completion,
    make_provider,
    parse_retry_after,
    with_retries,
)
from saelab.plugins.providers.openrouter import OPENROUTER_URL
from saelab.records import Usage

MESSAGES = [{"role": "system", "content": "You explain latents."}, {"role": "user", "content": "one two three"}]
SECRET = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    return tmp_path / "llm_cache"


HTTP_CLIENT = "auto"
"""The ``openai`` provider's transport in :func:`openai_provider` (set per test by the ``transport`` fixture)."""


@pytest.fixture(params=["aiohttp", "httpx"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs an ``openai`` provider test on each HTTP transport (aiohttp only where httpx-aiohttp is installed)."""
    if request.param == "aiohttp" and importlib.util.find_spec("httpx_aiohttp") is None:
        pytest.skip("httpx-aiohttp is not installed")
    monkeypatch.setattr(sys.modules[__name__], "HTTP_CLIENT", request.param)
    return request.param


def openai_provider(server: ScriptedLLMServer, cache_root: Path, **options):
    defaults = {"model": "test-model", "base_url": server.base_url, "cache_dir": str(cache_root),
                "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, "http_client": HTTP_CLIENT}
    defaults.update(options)
    return make_provider("openai", **defaults)


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------------ basics


def test_completion_text_usage_and_request_body(transport: str, cache_root: Path) -> None:
    with ScriptedLLMServer(Reply(text="[EXPLANATION]: numbers", prompt_tokens=11, completion_tokens=3)) as server:
        provider = openai_provider(server, cache_root, cache=False, temperature=0.5, max_tokens=40)
        completion = provider.generate_sync(MESSAGES)
        assert completion.text == "[EXPLANATION]: numbers"
        assert (completion.prompt_tokens, completion.completion_tokens) == (11, 3)
        assert completion.cached is False and completion.logprobs is None
        assert completion.provider == "openai" and completion.model == "test-model"
        body = server.chat_requests[0].body
        assert body["model"] == "test-model" and body["messages"] == MESSAGES
        assert body["temperature"] == 0.5 and body["max_tokens"] == 40
        assert "logprobs" not in body or body["logprobs"] is False
        # per-call overrides win over options
        provider.generate_sync(MESSAGES, max_tokens=7, stop=["\n"])
        assert server.chat_requests[1].body["max_tokens"] == 7 and server.chat_requests[1].body["stop"] == ["\n"]
        assert provider.usage.calls == 2 and provider.usage.prompt_tokens == 22


def test_logprobs_requested_and_parsed(transport: str, cache_root: Path) -> None:
    scripted = [{"token": "1", "logprob": -0.25, "top_logprobs": {"1": -0.25, "0": -1.5}},
                {"token": "]", "logprob": -0.01, "top_logprobs": [{"token": "]", "logprob": -0.01}]}]
    with ScriptedLLMServer(Reply(text="1]", logprobs=scripted)) as server:
        provider = openai_provider(server, cache_root, cache=False, logprobs=True, top_logprobs=2)
        completion = provider.generate_sync(MESSAGES)
        body = server.chat_requests[0].body
        assert body["logprobs"] is True and body["top_logprobs"] == 2
        assert completion.logprobs == [TokenLogprob("1", -0.25, {"1": -0.25, "0": -1.5}),
                                       TokenLogprob("]", -0.01, {"]": -0.01})]
        # top_logprobs is only sent with logprobs on
        provider.generate_sync(MESSAGES, logprobs=False)
        assert "top_logprobs" not in server.chat_requests[1].body


def test_cost_from_given_prices_and_litellm_map(transport: str, cache_root: Path) -> None:
    with ScriptedLLMServer(Reply(text="ok", prompt_tokens=1000, completion_tokens=500)) as server:
        priced = openai_provider(server, cache_root, cache=False, input_price_per_1k=0.5, output_price_per_1k=2.0)
        assert priced.generate_sync(MESSAGES).cost == pytest.approx(0.5 + 1.0)
        unknown = openai_provider(server, cache_root, cache=False, model="no-such-model-xyz")
        assert unknown.generate_sync(MESSAGES).cost is None
        assert unknown.usage.unpriced_calls == 1 and unknown.usage.cost == 0.0
        known = openai_provider(server, cache_root, cache=False, model="gpt-4o-mini")
        cost = known.generate_sync(MESSAGES).cost
        assert cost is not None and cost > 0  # from litellm's bundled cost map, read without importing it


# ------------------------------------------------------------------------------------------ failures


def test_malformed_answers_are_retried_then_succeed(transport: str, cache_root: Path) -> None:
    script = [Reply(body="this is not json"), Reply(body={"choices": []}),
              Reply(body={"choices": [{"message": {"role": "assistant"}}]}), Reply(text="fine")]
    with ScriptedLLMServer(script) as server:
        provider = openai_provider(server, cache_root, cache=False, max_retries=3)
        assert provider.generate_sync(MESSAGES).text == "fine"
        assert len(server.chat_requests) == 4 and provider.usage.retries == 3


def test_malformed_answers_give_up_with_one_clear_error(transport: str, cache_root: Path) -> None:
    with ScriptedLLMServer(Reply(body="<html>bad gateway</html>")) as server:
        provider = openai_provider(server, cache_root, cache=False, max_retries=2)
        with pytest.raises(ProviderError) as info:
            provider.generate_sync(MESSAGES)
        message = str(info.value)
        assert "\n" not in message and "after 3 attempts" in message and "malformed answer" in message
        assert "test-model" in message
        assert len(server.chat_requests) == 3 and provider.usage.failed_calls == 1


def test_429_waits_at_least_retry_after(transport: str, cache_root: Path) -> None:
    with ScriptedLLMServer([Reply(status=429, headers={"Retry-After": "1"}), Reply(text="ok")]) as server:
        provider = openai_provider(server, cache_root, cache=False)
        assert provider.generate_sync(MESSAGES).text == "ok"
        first, second = server.chat_requests
        assert second.started - first.finished >= 1.0  # backoff alone would be <= 0.05 s
        assert provider.usage.retries == 1


def test_429_with_http_date_retry_after(transport: str, cache_root: Path) -> None:
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=3), usegmt=True)
    with ScriptedLLMServer([Reply(status=429, headers={"Retry-After": when}), Reply(text="ok")]) as server:
        provider = openai_provider(server, cache_root, cache=False)
        assert provider.generate_sync(MESSAGES).text == "ok"
        first, second = server.chat_requests
        # HTTP dates have 1 s resolution (3 s ahead is 2-3 s ahead once truncated): the wait is at least
        # 1 s, far above the 0.05 s backoff cap
        assert second.started - first.finished >= 1.0


def test_500s_then_success_and_client_retries_off(transport: str, cache_root: Path) -> None:
    script = [Reply(status=500), Reply(status=503), Reply(text="recovered")]
    with ScriptedLLMServer(script) as server:
        provider = openai_provider(server, cache_root, cache=False, max_retries=2)
        assert provider.generate_sync(MESSAGES).text == "recovered"
        assert len(server.chat_requests) == 3 and provider.usage.retries == 2
    with ScriptedLLMServer(Reply(status=500)) as server:
        provider = openai_provider(server, cache_root, cache=False, max_retries=0)
        with pytest.raises(ProviderError, match="after 1 attempts: HTTP 500"):
            provider.generate_sync(MESSAGES)
        assert len(server.chat_requests) == 1  # the SDK's own retries are off


def test_400_is_not_retried(transport: str, cache_root: Path) -> None:
    with ScriptedLLMServer([Reply(status=400), Reply(text="never")]) as server:
        provider = openai_provider(server, cache_root, cache=False, max_retries=5)
        with pytest.raises(ProviderError, match="HTTP 400"):
            provider.generate_sync(MESSAGES)
        assert len(server.chat_requests) == 1


def test_timeouts_are_retried_then_give_up(transport: str, cache_root: Path) -> None:
    with ScriptedLLMServer([Reply(text="slow", delay_s=3.0), Reply(text="fast")]) as server:
        provider = openai_provider(server, cache_root, cache=False, timeout_s=0.3)
        start = time.monotonic()
        assert provider.generate_sync(MESSAGES).text == "fast"
        assert time.monotonic() - start < 2.5
        assert len(server.chat_requests) == 2
    with ScriptedLLMServer(Reply(text="slow", delay_s=3.0)) as server:
        provider = openai_provider(server, cache_root, cache=False, timeout_s=0.2, max_retries=1)
        with pytest.raises(ProviderError, match="after 2 attempts: timed out after 0.2 s"):
            provider.generate_sync(MESSAGES)


def test_connection_errors_are_retried(transport: str, cache_root: Path) -> None:
    with ScriptedLLMServer([Reply(drop=True), Reply(text="back")]) as server:
        provider = openai_provider(server, cache_root, cache=False)
        assert provider.generate_sync(MESSAGES).text == "back"
        assert len(server.chat_requests) == 2
    # a dropped connection and a refused one read as connection errors (not timeouts) on both transports
    with ScriptedLLMServer(Reply(drop=True)) as server:
        provider = openai_provider(server, cache_root, cache=False, max_retries=0)
        with pytest.raises(ProviderError, match="after 1 attempts: connection error"):
            provider.generate_sync(MESSAGES)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    provider = make_provider("openai", model="m", base_url=f"http://127.0.0.1:{port}/v1", cache=False,
                             max_retries=1, backoff_base_s=0.01, http_client=transport)
    with pytest.raises(ProviderError, match="after 2 attempts: connection error"):
        provider.generate_sync(MESSAGES)


def test_http_client_option_picks_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"model": "m", "base_url": "http://127.0.0.1:1/v1", "cache": False}
    installed = importlib.util.find_spec("httpx_aiohttp") is not None
    assert make_provider("openai", **base).http_client == ("aiohttp" if installed else "httpx")
    assert make_provider("openai", **base, http_client="httpx").http_client == "httpx"
    with pytest.raises(UsageError, match="http_client") as info:
        make_provider("openai", **base, http_client="requests")
    assert "\n" not in str(info.value) and "aiohttp" in str(info.value)
    monkeypatch.setitem(sys.modules, "httpx_aiohttp", None)  # as if the package were not installed
    assert make_provider("openai", **base).http_client == "httpx"
    with pytest.raises(UsageError, match="needs the httpx-aiohttp package") as info:
        make_provider("openai", **base, http_client="aiohttp")
    assert "\n" not in str(info.value)


def test_client_is_closed_when_its_loop_ends(transport: str, cache_root: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with ScriptedLLMServer(Reply(text="ok")) as server:
        provider = openai_provider(server, cache_root, cache=False)
        clients = []

        async def call() -> str:
            text = (await provider.generate(MESSAGES)).text
            clients.append(await provider._client())
            return text

        assert run(call()) == "ok"  # no aclose(): asyncio.run's shutdown closes the client
        client = clients[0]
        assert client.is_closed()
        assert isinstance(client._client, openai.DefaultAioHttpClient) == (transport == "aiohttp")
        del client
        clients.clear()
        caplog.set_level(logging.ERROR, logger="asyncio")
        gc.collect()
        assert "Unclosed" not in caplog.text
        assert run(call()) == "ok"  # a fresh loop: a fresh client


# ------------------------------------------------------------------------------------------ concurrency


@pytest.mark.parametrize("limit", [1, 4])
def test_concurrency_limit_is_reached_and_not_exceeded(transport: str, cache_root: Path, limit: int) -> None:
    n, delay = 8, 0.2
    with ScriptedLLMServer(Reply(text="slow ok", delay_s=delay)) as server:
        provider = openai_provider(server, cache_root, cache=False, max_concurrency=limit)

        async def many() -> list[Completion]:
            prompts = [[{"role": "user", "content": f"prompt {i}"}] for i in range(n)]
            return await asyncio.gather(*(provider.generate(p) for p in prompts))

        start = time.monotonic()
        results = run(many())
        elapsed = time.monotonic() - start
        assert [r.text for r in results] == ["slow ok"] * n
        assert server.max_in_flight == limit
        assert elapsed >= delay * n / limit - 0.05


def test_provider_works_across_event_loops(transport: str, cache_root: Path) -> None:
    with ScriptedLLMServer(Reply(text="ok")) as server:
        provider = openai_provider(server, cache_root, cache=False, max_concurrency=2)
        assert run(provider.generate(MESSAGES)).text == "ok"
        assert run(provider.generate(MESSAGES)).text == "ok"  # a fresh loop: new semaphore and client


# ------------------------------------------------------------------------------------------ cache


def test_response_cache_hit_makes_no_request(transport: str, cache_root: Path) -> None:
    with ScriptedLLMServer(lambda req: Reply(text=f"answer to {req['messages'][-1]['content']}")) as server:
        provider = openai_provider(server, cache_root)
        first = provider.generate_sync(MESSAGES)
        again = openai_provider(server, cache_root).generate_sync(MESSAGES)  # a new provider, same cache dir
        assert len(server.chat_requests) == 1
        assert again.cached is True and first.cached is False and again.text == first.text
        assert len(ResponseCache(cache_root)) == 1
        provider.generate_sync(MESSAGES, temperature=0.7)  # other params: another entry
        other = [{"role": "user", "content": "four"}]
        assert provider.generate_sync(other).text == "answer to four"
        assert len(server.chat_requests) == 3
        assert provider.usage.cached_calls == 0 and provider.usage.calls == 3


def test_cache_off_makes_requests(transport: str, cache_root: Path) -> None:
    with ScriptedLLMServer(Reply(text="same")) as server:
        provider = openai_provider(server, cache_root, cache=False)
        provider.generate_sync(MESSAGES)
        provider.generate_sync(MESSAGES)
        assert len(server.chat_requests) == 2 and not cache_root.exists()


def test_cache_key_depends_on_each_part() -> None:
    base = cache_key("openai", "m", MESSAGES, {"temperature": 0})
    assert base == cache_key("openai", "m", [dict(m) for m in MESSAGES], {"temperature": 0})
    assert len({base, cache_key("litellm", "m", MESSAGES, {"temperature": 0}),
                cache_key("openai", "m2", MESSAGES, {"temperature": 0}),
                cache_key("openai", "m", MESSAGES[:1], {"temperature": 0}),
                cache_key("openai", "m", MESSAGES, {"temperature": 1})}) == 5


def test_corrupt_cache_entry_is_a_miss(cache_root: Path) -> None:
    cache = ResponseCache(cache_root)
    key = "ab" + "0" * 62
    cache.put(key, Completion(text="x"))
    assert cache.get(key).text == "x"
    cache.path(key).write_text("{truncated")
    assert cache.get(key) is None and not cache.path(key).exists()


# ------------------------------------------------------------------------------------------ secrets


def test_api_key_never_written_or_logged(transport: str, tmp_path: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MY_LLM_KEY", SECRET)

    echoed_500 = iter([True])

    def leaky(request: dict) -> Reply:
        if request["messages"][-1]["content"] == "fail":
            return Reply(status=401, body={"error": {"message": f"invalid key Bearer {SECRET}"}})
        if next(echoed_500, False):  # a retried error whose message echoes the key: logged, scrubbed
            return Reply(status=500, body={"error": {"message": f"upstream rejected api_key={SECRET}"}})
        # a server that echoes the key inside its answer: it must not reach the cache or `raw`
        return Reply(body={"choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                           "system_fingerprint": SECRET, "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    caplog.set_level(logging.DEBUG)
    with ScriptedLLMServer(leaky) as server:
        provider = openai_provider(server, cache_root, api_key_env="MY_LLM_KEY")
        completion = provider.generate_sync(MESSAGES)
        assert server.chat_requests[0].headers["authorization"] == f"Bearer {SECRET}"  # it is sent...
        assert provider.usage.retries == 1 and "retrying" in caplog.text and "HTTP 500" in caplog.text
        assert SECRET not in repr(completion) and SECRET not in repr(provider.options)
        with pytest.raises(ProviderError) as info:
            provider.generate_sync([{"role": "user", "content": "fail"}])
        assert SECRET not in str(info.value) and "HTTP 401" in str(info.value)
    assert SECRET not in caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written  # the cache entry exists
    for path in written:
        assert SECRET not in path.read_text(errors="replace"), path


# ------------------------------------------------------------------------------------------ names and options


def test_make_provider_maps_delphi_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    router = make_provider("openrouter", model="meta-llama/llama-3.1-70b-instruct", cache=False)
    assert router.identity()["provider"] == "openai" and router.options.base_url == OPENROUTER_URL
    assert router.options.api_key_env == "OPENROUTER_API_KEY"
    vllm = make_provider("vllm", model="m", base_url="http://localhost:8002/v1", cache=False)
    assert vllm.identity()["provider"] == "openai" and vllm.options.base_url == "http://localhost:8002/v1"
    assert make_provider("vllm", model="m", cache=False).options.base_url == "http://localhost:8000/v1"
    offline = make_provider("OFFLINE", cache=False)
    assert offline.identity()["provider"] == "transformers" and offline.model == "smollm2"
    assert (router.name, vllm.name, offline.name) == ("openrouter", "vllm", "offline")  # registered names
    assert make_provider("litellm", model="openai/x", cache=False).name == "litellm"
    assert make_provider("openai", model="m", base_url="http://127.0.0.1:1/v1", max_concurrency=None,
                         cache=False).max_concurrency == 8


def test_provider_user_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cases = [
        (lambda: make_provider("openrouter", model="m"), "OPENROUTER_API_KEY"),
        (lambda: make_provider("openai", model="gpt-4o-mini"), "OPENAI_API_KEY"),
        (lambda: make_provider("openai", model="m", base_url="http://x/v1", api_key_env="NOPE_KEY"), "NOPE_KEY"),
        (lambda: make_provider("no-such-provider"),
         "known providers: litellm, offline, openai, openrouter, transformers, vllm"),
        (lambda: make_provider("openai", model="m", base_url="http://x/v1", temprature=1), "temprature"),
        (lambda: make_provider("openai", model="m", base_url="http://x/v1", max_concurrency=0), "max_concurrency"),
        (lambda: make_provider("openai", base_url="http://x/v1"), "needs a model"),
    ]
    for build, fragment in cases:
        with pytest.raises(UsageError) as info:
            build()
        assert fragment in str(info.value) and "\n" not in str(info.value)
    provider = make_provider("transformers", cache=False)
    with pytest.raises(UsageError, match="does not accept parameter 'response_format'"):
        provider.generate_sync(MESSAGES, response_format={"type": "json"})
    with pytest.raises(UsageError, match="bad chat message"):
        provider.generate_sync([{"role": "user"}])


def test_presets_are_registered_providers_listed_by_saelab_plugins(cli) -> None:
    r = cli("plugins", "--kind", "provider", "--json")
    assert r.exit_code == 0, r.output
    registers = {row["name"]: row["registers"]["provider"] for row in json.loads(r.stdout)}
    assert registers["vllm"] == ["vllm"] and registers["openrouter"] == ["openrouter"]
    assert set(registers["transformers"]) == {"transformers", "offline"}
    assert {"openai", "litellm"} <= set(registers)


def test_presets_share_answers_and_fingerprints_with_the_provider_they_preset(cache_root: Path) -> None:
    with ScriptedLLMServer(Reply(text="[EXPLANATION]: shared")) as server:
        vllm = make_provider("vllm", model="test-model", base_url=server.base_url, cache_dir=str(cache_root))
        assert vllm.generate_sync(MESSAGES).text == "[EXPLANATION]: shared"
        openai_ = make_provider("openai", model="test-model", base_url=server.base_url, cache_dir=str(cache_root))
        again = openai_.generate_sync(MESSAGES)
        assert again.cached and again.provider == "openai" and len(server.chat_requests) == 1
        assert vllm.identity() == openai_.identity()


def test_a_third_party_provider_taking_a_builtin_name_is_one_line(cli) -> None:
    class Impostor(LLMProvider):
        """A third-party provider that takes the builtin name ``vllm``."""

        name = "vllm"

    class Acme:
        @hookimpl
        def register_providers(self, register) -> None:
            register(Impostor)

    saelab.register_plugin(Acme(), name="acme")
    r = cli("plugins", "--kind", "provider")
    r.assert_user_error("provider name 'vllm' is registered twice", "(plugin 'vllm')", "(plugin 'acme')",
                        "disable one with -p no:", "-p no:vllm", "-p no:acme")
    assert cli("plugins", "-p", "no:vllm", "--kind", "provider").exit_code == 0


class Shout(saelab.Provider):
    """A third-party provider without the LLMProvider base: no options, answers in capitals."""

    name = "shout"

    def __init__(self, options: saelab.Options | None = None) -> None:
        self.options = options

    async def generate(self, messages, **params) -> Completion:
        return Completion(text=messages[-1]["content"].upper(), prompt_tokens=1, completion_tokens=1, cost=0.0)


class Mumble(Shout):
    """A broken provider: returns a ``str`` instead of a Completion."""

    name = "mumble"

    async def generate(self, messages, **params):  # type: ignore[override]
        return "not a completion"


class ThirdPartyProviders:
    @hookimpl
    def register_providers(self, register) -> None:
        register(Shout)
        register(Mumble)


def test_run_options_are_validated_never_dropped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from saelab.pipeline import make_run_provider

    saelab.register_plugin(ThirdPartyProviders(), name="third-party-providers")
    settings = {"model": "m", "base_url": "http://127.0.0.1:1/v1", "max_concurrency": 4, "api_key_env": None,
                "cache": True, "cache_dir": tmp_path, "device": "cpu"}
    # the run's own settings are handed over only where the provider takes them (device: the subject model's)
    assert isinstance(make_run_provider("shout", **settings), Shout)
    vllm = make_run_provider("vllm", **settings, given={"model", "base_url", "max_concurrency"})
    assert (vllm.model, vllm.max_concurrency, vllm.options.cache_dir) == ("m", 4, str(tmp_path))
    with pytest.raises(UsageError) as info:  # a flag the user gave that the provider does not take
        make_run_provider("shout", **settings, given={"model"})
    assert "provider 'shout'" in str(info.value) and "'model'" in str(info.value)
    with pytest.raises(UsageError) as info:
        make_run_provider("vllm", **settings, extra={"bogus": 1})
    message = str(info.value)
    assert "\n" not in message and "provider 'vllm'" in message and "'bogus'" in message
    assert "timeout_s" in message and "base_url" in message  # the accepted options
    with pytest.raises(UsageError, match="'device'"):
        make_run_provider("openai", **settings, extra={"device": "cuda"})
    transformers = make_run_provider("offline", **{**settings, "model": None}, extra={"batch_wait_ms": 1})
    assert (transformers.options.device, transformers.options.batch_wait_ms) == ("cpu", 1)


def test_run_rejects_an_unknown_provider_option_before_any_work(cli, results_dir: Path, tmp_path: Path) -> None:
    from pipeline_helpers import make_dictionary, run_args

    d = make_dictionary(tmp_path / "dict")
    r = cli(*run_args(d, "bad", "http://127.0.0.1:9/v1", "--provider_option", "bogus", "1"),
            env={"OPENAI_API_KEY": None})
    r.assert_user_error("provider 'openai'", "unknown option 'bogus'", "accepted options:", "timeout_s")
    assert not (results_dir / ".activations").exists() and not (results_dir / "bad" / "latents").exists()
    saelab.register_plugin(ThirdPartyProviders(), name="third-party-providers")
    args = run_args(d, "bad", "http://127.0.0.1:9/v1")
    args[args.index("openai")] = "shout"
    r = cli(*args)  # --explainer_model (and --explainer_api_base_url) given explicitly: shout has no such options
    r.assert_user_error("provider 'shout'", "unknown option 'model'")
    assert not (results_dir / "bad" / "latents").exists()


def test_the_engine_rejects_a_provider_that_returns_another_type() -> None:
    from interp_helpers import make_record
    from saelab.pipeline import make_explainer

    saelab.register_plugin(ThirdPartyProviders(), name="third-party-providers")
    explainer = make_explainer("default")
    good = run(explainer.explain(make_record(), make_provider("shout")))
    assert good.error is None and good.usage.calls == 1 and good.usage.prompt_tokens == 1
    with pytest.raises(UsageError) as info:
        run(explainer.explain(make_record(), make_provider("mumble")))
    message = str(info.value)
    assert "provider 'mumble'" in message and "builtins.str" in message and "saelab.llm.Completion" in message
    with pytest.raises(UsageError, match="expected saelab.llm.Completion"):
        check_completion(Mumble(), "text")


# ------------------------------------------------------------------------------------------ retry machinery


def test_parse_retry_after() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=now.timestamp()) == pytest.approx(30.0)
    assert parse_retry_after({"Retry-After": format_datetime(now - timedelta(seconds=30), usegmt=True)},
                             now=now.timestamp()) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_with_retries_backoff_schedule() -> None:
    delays: list[float] = []
    failures = [TransientError("HTTP 503"), TransientError("HTTP 429", retry_after=7.0), TimeoutError(),
                ConnectionResetError("reset"), TransientError("HTTP 500")]

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)

    async def attempt() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    result = run(with_retries(attempt, max_retries=5, backoff_base_s=1.0, backoff_max_s=4.0, sleep=fake_sleep,
                              jitter=lambda: 1.0))
    assert result == "done"
    assert delays == [1.0, 7.0, 4.0, 4.0, 4.0]  # doubling, capped at 4, never below Retry-After

    async def always() -> str:
        raise TransientError("HTTP 502: bad gateway")

    with pytest.raises(ProviderError, match="summarise failed after 3 attempts: HTTP 502: bad gateway"):
        run(with_retries(always, max_retries=2, what="summarise", sleep=fake_sleep))

    async def fatal() -> str:
        raise ProviderError("HTTP 401")

    delays.clear()
    with pytest.raises(ProviderError, match="HTTP 401"):
        run(with_retries(fatal, max_retries=5, sleep=fake_sleep))
    assert delays == []


def test_usage_totals_add_and_json() -> None:
    usage = Usage()
    usage.record(Completion(text="a", prompt_tokens=10, completion_tokens=2, cost=0.5))
    usage.record(Completion(text="b", prompt_tokens=10, completion_tokens=2, cost=None))
    usage.record(Completion(text="c", prompt_tokens=10, completion_tokens=2, cost=0.5, cached=True))
    total = usage + usage
    assert total.to_json() == {"calls": 4, "cached_calls": 2, "failed_calls": 0, "retries": 0,
                               "prompt_tokens": 40, "completion_tokens": 8, "cost": 1.0, "unpriced_calls": 2}
    completion = Completion(text="x", logprobs=[TokenLogprob("1", -0.1, {"1": -0.1})], cost=0.1)
    assert Completion.from_json(completion.to_json()) == completion


def test_one_usage_type_for_providers_runs_and_records() -> None:
    fresh = Completion(text="a", prompt_tokens=10, completion_tokens=2, cost=0.5)
    hit = Completion(text="a", prompt_tokens=10, completion_tokens=2, cost=0.5, cached=True)
    totals = Usage(cost=0.0)  # a provider's running totals: a cache hit costs nothing
    totals.record(fresh)
    before = totals.snapshot()
    totals.record(hit)
    totals.record(Completion(text="b", prompt_tokens=3, completion_tokens=1))
    delta = totals - before
    assert delta.to_json() == {"calls": 1, "cached_calls": 1, "failed_calls": 0, "retries": 0, "prompt_tokens": 3,
                               "completion_tokens": 1, "cost": 0.0, "unpriced_calls": 1}
    assert before.calls == 1  # a snapshot does not move with the totals
    result = Usage()  # one explanation's or score's usage: every answer it used, cache hits included
    result.add(fresh)
    result.add(hit)
    assert result.to_dict() == {"calls": 2, "cached_calls": 1, "prompt_tokens": 20, "completion_tokens": 4, "cost": 1.0}
    assert Usage.from_dict(result.to_dict()) == result  # what a record file holds round-trips
    assert Usage().to_dict() == {"calls": 0, "cached_calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                 "cost": None}  # the keys stored in explanation and score files


def test_provider_redaction_is_the_config_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_LLM_KEY", SECRET)
    provider = make_provider("openai", model="m", base_url="http://127.0.0.1:1/v1", api_key_env="MY_LLM_KEY",
                             cache=False)
    raw = {"echo": f"key {SECRET}", "choices": [{"logprobs": {"content": [{"token": "1", "logprob": -0.1}]}}]}
    assert provider.redact(raw) == {"echo": "key <redacted>",
                                    "choices": [{"logprobs": {"content": [{"token": "1", "logprob": -0.1}]}}]}
    assert provider.redact("HTTP 401: Bearer abcdefgh12345 api_key=zyxwvuts9876") == (
        "HTTP 401: Bearer <redacted> api_key=<redacted>")


# ------------------------------------------------------------------------------------------ transformers


def tiny_provider(**options):
    from fixtures.tiny_models import TINY_GPT2

    defaults = {"model": str(TINY_GPT2), "cache": False, "device": "cpu", "max_tokens": 6,
                "logprobs": True, "top_logprobs": 3, "batch_wait_ms": 20}
    defaults.update(options)
    return make_provider("offline", **defaults)


def test_transformers_batches_concurrent_prompts_into_one_generate() -> None:
    provider = tiny_provider()
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * (i + 1)}]
               for i in range(5)]  # different lengths: left padding matters

    async def together() -> list[Completion]:
        return await asyncio.gather(*(provider.generate(p) for p in prompts))

    batched = run(together())
    assert provider.generate_calls == 1 and provider.batch_sizes == [5]
    alone = [provider.generate_sync(p) for p in prompts]
    assert provider.generate_calls == 6
    _, tokenizer = provider.load()
    for b, a, prompt in zip(batched, alone, prompts, strict=True):
        assert b.text == a.text and b.completion_tokens == a.completion_tokens
        # padding must not change the numbers: same per-token logprobs batched and alone
        assert [t.token for t in b.logprobs] == [t.token for t in a.logprobs]
        assert [t.logprob for t in b.logprobs] == pytest.approx([t.logprob for t in a.logprobs], abs=1e-4)
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert b.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert b.cost == 0.0 and b.provider == "transformers"
        for entry in b.logprobs:
            assert len(entry.top_logprobs) <= 3 and entry.logprob <= max(entry.top_logprobs.values()) + 1e-6
    assert "User: word word" in batched[1].raw["prompt"]  # the fallback chat template (fixture has none)


def test_transformers_logprobs_match_a_forward_pass() -> None:
    # repetition controls off: the greedy check below compares with the raw distribution
    provider = tiny_provider(max_tokens=4, top_logprobs=2, repetition_penalty=1.0, no_repeat_ngram_size=0)
    completion = provider.generate_sync(MESSAGES)
    logits = forward_logprobs(provider, completion)
    expected = [float(logits[j, tok]) for j, tok in enumerate(completion.raw["generated_ids"])]
    got = [t.logprob for t in completion.logprobs]
    assert got == pytest.approx(expected[: len(got)], abs=1e-4)
    # greedy: each generated token is the most likely one
    assert all(abs(t.logprob - max(t.top_logprobs.values())) < 1e-6 for t in completion.logprobs)


def test_transformers_stop_strings_and_no_logprobs() -> None:
    provider = tiny_provider(logprobs=False)
    first = provider.generate_sync(MESSAGES)
    assert first.logprobs is None and first.completion_tokens == 6 and first.finish_reason == "length"
    stop = next(c for c in first.text if c.strip())
    cut = provider.generate_sync(MESSAGES, stop=[stop])
    assert cut.text == first.text[: first.text.index(stop)] and cut.finish_reason == "stop"


def forward_logprobs(provider, completion):
    """Unconstrained log-softmax over the vocabulary at each generated step, from one forward pass."""
    import torch

    model, tokenizer = provider.load()
    prompt_ids = tokenizer(completion.raw["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    generated = torch.tensor([completion.raw["generated_ids"]])
    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, generated], dim=1)).logits[0].log_softmax(-1)
    start = prompt_ids.shape[1] - 1
    return logits[start:start + generated.shape[1]]


def test_transformers_answer_format_binary_list_in_one_batch() -> None:
    from saelab.autointerp import binary_probabilities, parse_binary_list

    provider = tiny_provider(max_tokens=60, top_logprobs=2)
    lengths = [1, 2, 3, 5, 8]
    prompts = [[{"role": "user", "content": f"Classify {n} examples: " + "word " * (i + 1)}]
               for i, n in enumerate(lengths)]

    async def together() -> list[Completion]:
        constrained = [provider.generate(p, answer_format={"type": "binary_list", "length": n})
                       for p, n in zip(prompts, lengths, strict=True)]
        return await asyncio.gather(*constrained, provider.generate(prompts[2]))  # + one free row

    *answers, free = run(together())
    assert provider.generate_calls == 1 and provider.batch_sizes == [6]  # per-row formats, one generate
    assert parse_binary_list(free.text, 3) is None  # random weights never write a list unconstrained
    _, tokenizer = provider.load()
    for answer, n in zip(answers, lengths, strict=True):
        values = parse_binary_list(answer.text, n)
        assert values is not None and len(values) == n and set(values) <= {0, 1}, answer.text
        assert answer.text.strip().startswith("[") and answer.text.strip().endswith("]")
        assert answer.finish_reason == "stop" and answer.raw["generated_ids"][-1] == tokenizer.eos_token_id
        # logprobs come from the unconstrained distribution, and each digit position offers both classes
        lp = forward_logprobs(provider, answer)
        ids = answer.raw["generated_ids"]
        assert [t.logprob for t in answer.logprobs] == pytest.approx([float(lp[j, t]) for j, t in
                                                                      enumerate(ids[:len(answer.logprobs)])], abs=1e-4)
        probs = binary_probabilities(answer, n)
        assert probs is not None and len(probs) == n and all(0.0 < p < 1.0 for p in probs)
        digit_steps = [j for j, t in enumerate(answer.logprobs) if t.token.strip(" [],") in ("0", "1")]
        assert len(digit_steps) == n
        for j, p in zip(digit_steps, probs, strict=True):
            mass = {"0": 0.0, "1": 0.0}  # every allowed token reading 0 / 1 ("1", " 1", "[1"...) counts
            for tok, v in answer.logprobs[j].top_logprobs.items():
                if tok.strip(" [],") in mass:
                    mass[tok.strip(" [],")] += math.exp(v)
            assert mass["0"] > 0 and mass["1"] > 0
            assert p == pytest.approx(mass["1"] / (mass["0"] + mass["1"]))
            assert answer.logprobs[j].token in answer.logprobs[j].top_logprobs


def test_transformers_answer_format_choice_and_prefixed_line() -> None:
    provider = tiny_provider(max_tokens=12, logprobs=False)
    options = ["1", "2", "3", "12"]
    choices = [provider.generate_sync([{"role": "user", "content": "Pick one " * k}],
                                      answer_format={"type": "choice", "options": options}) for k in range(1, 4)]
    assert all(c.text.strip() in options and c.finish_reason == "stop" for c in choices)
    line = provider.generate_sync(MESSAGES, max_tokens=40,
                                  answer_format={"type": "prefixed_line", "prefix": "[EXPLANATION]:"})
    assert line.text.lstrip().startswith("[EXPLANATION]:") and "\n" not in line.text
    free = provider.generate_sync(MESSAGES)
    assert not free.text.lstrip().startswith("[EXPLANATION]:")


def test_generated_repetition_guard_ignores_the_prompt() -> None:
    import torch
    from saelab.plugins.providers.transformers_provider import GeneratedRepetitionGuard

    ids = torch.tensor([[7, 8, 9, 7, 8, 5, 7, 8]])  # prompt: 7 8 9 7 8; generated: 5 7 8
    scores = torch.ones(1, 10)
    out = GeneratedRepetitionGuard(start=5, rows=[0], penalty=2.0, ngram=0)(ids, scores)
    assert scores.eq(1.0).all()  # not modified in place (generate keeps that tensor as the raw logits)
    assert out[0].tolist() == [1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5, 1]  # 9 was only in the prompt: untouched
    # generated 3 5 ... 3: a second "3 5" would repeat a bigram; the prompt's "1 2" does not count
    banned = GeneratedRepetitionGuard(start=2, rows=[0], penalty=1.0, ngram=2)(torch.tensor([[1, 2, 3, 5, 3]]), scores)
    assert torch.isinf(banned[0]).nonzero().flatten().tolist() == [5]
    prompt_only = GeneratedRepetitionGuard(start=3, rows=[0], penalty=1.0, ngram=2)(torch.tensor([[3, 5, 1, 3]]), scores)
    assert not torch.isinf(prompt_only).any()


def test_answer_format_is_in_the_cache_key_and_not_sent_to_apis(transport: str, cache_root: Path) -> None:
    binary3 = {"type": "binary_list", "length": 3}
    assert cache_key("openai", "m", MESSAGES, {"answer_format": binary3}) != cache_key("openai", "m", MESSAGES, {})
    assert cache_key("openai", "m", MESSAGES, {"answer_format": binary3}) != cache_key(
        "openai", "m", MESSAGES, {"answer_format": {"type": "binary_list", "length": 4}})
    with ScriptedLLMServer(lambda req: Reply(text="[1, 0, 1]")) as server:
        provider = openai_provider(server, cache_root)
        provider.generate_sync(MESSAGES, answer_format=binary3)
        assert "answer_format" not in server.chat_requests[0].body  # nothing non-standard sent to the API
        provider.generate_sync(MESSAGES)  # same messages without a format: another entry
        provider.generate_sync(MESSAGES, answer_format={"type": "binary_list", "length": 4})
        assert len(server.chat_requests) == 3
        assert provider.generate_sync(MESSAGES, answer_format=dict(binary3)).cached
        assert len(server.chat_requests) == 3 and len(ResponseCache(cache_root)) == 3
        for bad in ({"type": "binary_list", "length": 0}, {"type": "json"}, {"type": "choice", "options": []}):
            with pytest.raises(UsageError, match="bad answer_format"):
                provider.generate_sync(MESSAGES, answer_format=bad)


@pytest.mark.slow
def test_offline_provider_answers_with_the_embedded_smollm2() -> None:
    provider = make_provider("offline", cache=False, max_tokens=12)
    questions = ["What is the capital of France? Answer with one word.", "What is 2 + 2? Answer with a number."]

    async def both() -> list[Completion]:
        return await asyncio.gather(*(provider.generate([{"role": "user", "content": q}]) for q in questions))

    paris, four = run(both())
    assert provider.generate_calls == 1 and provider.batch_sizes == [2]
    assert "paris" in paris.text.lower() and "4" in four.text
    assert "<|im_start|>assistant" in paris.raw["prompt"]  # SmolLM2's own chat template


# ------------------------------------------------------------------------------------------ litellm


def test_litellm_against_the_local_server(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    script = [Reply(status=429, headers={"Retry-After": "1"}),
              Reply(text="1", logprobs=[{"token": "1", "logprob": -0.2, "top_logprobs": {"1": -0.2, "0": -1.8}}],
                    prompt_tokens=100, completion_tokens=10)]
    with ScriptedLLMServer(script) as server:
        provider = make_provider("litellm", model="openai/gpt-4o-mini", base_url=server.base_url,
                                 cache_dir=str(cache_root), backoff_base_s=0.01, backoff_max_s=0.05,
                                 logprobs=True, top_logprobs=2)
        completion = provider.generate_sync(MESSAGES)
        first, second = server.chat_requests
        assert second.started - first.finished >= 1.0
        assert second.body["model"] == "gpt-4o-mini" and second.body["top_logprobs"] == 2
        assert completion.text == "1" and completion.logprobs == [TokenLogprob("1", -0.2, {"1": -0.2, "0": -1.8})]
        assert (completion.prompt_tokens, completion.completion_tokens) == (100, 10)
        assert completion.cost is not None and completion.cost > 0
        again = provider.generate_sync(MESSAGES)
        assert again.cached and len(server.chat_requests) == 2
    for path in cache_root.rglob("*.json"):
        assert SECRET not in path.read_text()
