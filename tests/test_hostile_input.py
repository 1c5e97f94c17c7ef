"""Hostile input against a real server (tiny checkpoint, API key on, loopback): every bad request is a fast
4xx in the OpenAI error shape, and the engine keeps serving.

Each case below was either found by a hostile-input run against `jengine serve` (an OverflowError that
killed the engine loop, `n` = 2**63 that hung the server, a lone surrogate that gave a 500, a 20 MB
body that blocked the event loop, a request chat template that never finished) or is one of the
classic malformed inputs (invalid JSON, wrong types for every sampling field, out-of-range values).
"""
from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from jengine.server.api_server import BackgroundServer
from tiny_models import VOCAB_SIZE
from tiny_server import StepWatch, eventually, slow_down_steps, tiny_server

KEY = "sk-hostile"
MODEL = "tiny"
MAX_MODEL_LEN = 512
BODY_LIMIT = 64 * 1024
FAST_S = 5.0  # a refusal is answered well within this, even on a loaded 2-core machine
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, xla_cache_dir: str):
    with tiny_server(tmp_path_factory.mktemp("ckpt"), xla_cache_dir, MAX_MODEL_LEN, api_keys=(KEY,), served_model_names=(MODEL,),
                     max_request_body_bytes=BODY_LIMIT, chat_template_timeout_s=1.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: BackgroundServer):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60.0) as c:
        yield c


def _assert_openai_error(r: httpx.Response, status: int, param: Any = "any") -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"], err
    if param != "any":
        assert err["param"] == param, err
    return err


def _healthy_and_serving(http: httpx.Client, server: BackgroundServer) -> None:
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0.0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    assert server.engine.core.compilations_after_warmup == 0


# ----- hand-written hostile bodies: (path, raw JSON text or object, status, param) ----------------------------
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


C, CHAT, TOK = "/v1/completions", "/v1/chat/completions", "/tokenize"
RAW_CASES = [  # bodies the official client would never send
    (C, "", 400, None),
    (C, "{", 400, None),
    (C, '{"model": "tiny", "prompt": "hi",}', 400, None),
    (C, "[1, 2]", 400, None),
    (C, '"just a string"', 400, None),
    (C, '{"model": "tiny", "prompt": "a\x00b"}', 400, None),  # a raw NUL inside a JSON string is invalid JSON
    (C, '{"model": "tiny", "prompt": ' + _nested(5000) + "}", 400, None),
    (C, '{"model": "tiny", "prompt": "hi", "user": ' + _nested(5000) + "}", 400, None),  # unknown depth in any field
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": ' + _nested(5000) + "}]}", 400, None),
    (C, '{"model": "tiny", "prompt": "a\\ud800b"}', 400, None),  # lone surrogates
    (C, '{"model": "tiny", "prompt": "a\\udc00"}', 400, None),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    (TOK, '{"model": "tiny", "prompt": "\\udfff"}', 400, None),
    (C, '{"model": "tiny", "prompt": "hi", "temperature": 1e999}', 400, "temperature"),  # infinity
]

SAMPLING_FIELDS = ["n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logprobs", "prompt_logprobs", "stop", "stop_token_ids", "logit_bias",
                   "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output", "priority",
                   "stream", "echo", "best_of", "response_format", "stream_options", "min_tokens", "return_tokens_as_token_ids"]
CHAT_FIELDS = ["logprobs", "top_logprobs", "max_completion_tokens", "add_generation_prompt", "continue_final_message", "tools",
               "chat_template_kwargs"]
HUGE = 2**63
BIG = 2**40
OBJECT_CASES = [
    *[(C, {"prompt": "hi", field: {"not": "a value"}}, 400, field) for field in SAMPLING_FIELDS if field != "stream_options"],
    *[(C, {"prompt": "hi", field: "xyz"}, 400, field) for field in SAMPLING_FIELDS if field not in ("stop",)],
    *[(CHAT, {"messages": MSGS, field: "xyz"}, 400, field) for field in CHAT_FIELDS],
    (C, {"prompt": "hi", "n": 10000}, 400, "n"),
    (C, {"prompt": "hi", "n": HUGE}, 400, "n"),
    (C, {"prompt": "hi", "n": HUGE, "best_of": HUGE}, 400, "n"),
    (C, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    (C, {"prompt": "hi", "logprobs": 10**6}, 400, "logprobs"),
    (C, {"prompt": "hi", "prompt_logprobs": HUGE}, 400, "prompt_logprobs"),
    (CHAT, {"messages": MSGS, "logprobs": True, "top_logprobs": 10**6}, 400, "top_logprobs"),
    (C, {"prompt": "hi", "max_tokens": HUGE}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"messages": MSGS, "max_completion_tokens": HUGE}, 400, "max_completion_tokens"),
    (C, {"prompt": "hi", "min_tokens": BIG, "max_tokens": None}, 400, "min_tokens"),
    (C, {"prompt": "hi", "stop_token_ids": [BIG], "min_tokens": 2}, 400, "stop_token_ids"),  # killed the engine loop
    (C, {"prompt": "hi", "stop_token_ids": [VOCAB_SIZE]}, 400, "stop_token_ids"),
    (C, {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (C, {"prompt": "hi", "stop_token_ids": list(range(2000))}, 400, "stop_token_ids"),
    (C, {"prompt": "hi", "stop": ["x"] * 100}, 400, "stop"),
    (C, {"prompt": "hi", "stop": "x" * 5000}, 400, "stop"),
    (C, {"prompt": "hi", "top_k": BIG, "temperature": 1.0}, 400, "top_k"),
    (C, {"prompt": "hi", "top_k": VOCAB_SIZE + 1, "temperature": 1.0}, 400, "top_k"),
    (C, {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    (C, {"prompt": "hi", "repetition_penalty": 1e-38, "temperature": 1.0}, 400, "repetition_penalty"),  # overflowed float32 in the sampler
    (C, {"prompt": "hi", "repetition_penalty": 1e300}, 400, "repetition_penalty"),
    (C, {"prompt": "hi", "temperature": 1e300}, 400, "temperature"),
    (C, {"prompt": "hi", "priority": 2**70}, 400, "priority"),
    (C, {"prompt": "hi", "logit_bias": {str(BIG): 1}}, 400, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    (C, {"prompt": ["hi"] * 300}, 400, "prompt"),
    (C, {"prompt": [VOCAB_SIZE]}, 400, "prompt"),
    (C, {"prompt": [BIG]}, 400, "prompt"),
    (C, {"prompt": [[1, 2], [HUGE]]}, 400, "prompt"),
    (C, {"prompt": "hi " * 2000}, 400, "prompt"),  # tokenizes to far more than max_model_len
    (C, {"prompt": list(range(1, 300)) * 3}, 400, "prompt"),
    (C, {"prompt": "x" * 40000}, 400, "prompt"),  # more characters than the window can hold: refused untokenized
    (CHAT, {"messages": [{"role": "user", "content": "hi " * 2000}]}, 400, "messages"),
    (CHAT, {"messages": MSGS, "chat_template": "{{ messages[0]['content'] }}"}, 400, "chat_template"),  # not trusted
    (CHAT, {"messages": MSGS, "chat_template_kwargs": {"tokenize": True}}, 400, "chat_template_kwargs"),
    (CHAT, {"messages": MSGS, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, 400, "chat_template_kwargs"),
    (TOK, {"messages": MSGS, "chat_template": "{{ 1 }}"}, 400, "chat_template"),
    (C, {"prompt": "hi", "model": "no-such-model"}, 404, "model"),
    (CHAT, {"messages": MSGS, "model": "no-such-model"}, 404, "model"),
    ("/detokenize", {"tokens": [BIG]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
]


@pytest.mark.parametrize("path,raw,status,param", RAW_CASES, ids=[f"raw{i}" for i in range(len(RAW_CASES))])
def test_malformed_bodies(http: httpx.Client, path: str, raw: str, status: int, param: Any) -> None:
    t0 = time.monotonic()
    r = http.post(path, content=raw.encode("utf-8", "surrogatepass"), headers={"Content-Type": "application/json"})
    _assert_openai_error(r, status, param)
    assert time.monotonic() - t0 < FAST_S


@pytest.mark.parametrize("path,body,status,param", OBJECT_CASES, ids=[f"{p.strip('/').replace('/', '_')}-{param}-{i}" for i, (p, _, _, param) in enumerate(OBJECT_CASES)])
def test_bad_values(http: httpx.Client, path: str, body: dict, status: int, param: Any) -> None:
    t0 = time.monotonic()
    r = http.post(path, json={"model": MODEL, **body})
    _assert_openai_error(r, status, param)
    assert time.monotonic() - t0 < FAST_S


def test_nul_bytes_in_text_are_served(http: httpx.Client) -> None:
    """An escaped NUL is valid text: a well-formed 200, not an error."""
    r = http.post(C, json={"model": MODEL, "prompt": "a\u0000b", "max_tokens": 2, "stop": ["\u0000"]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


def test_api_key_missing_or_wrong(server: BackgroundServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}):
            err = _assert_openai_error(c.post(C, json={"model": MODEL, "prompt": "hi"}, headers=headers), 401)
            assert err["code"] == "invalid_api_key"
        # Refused before the body is read: a body over the limit without a key is a 401, not a 413.
        _assert_openai_error(c.post(C, content=b"x" * (BODY_LIMIT + 1), headers={"Content-Type": "application/json"}), 401)


def test_body_over_the_limit_is_413(http: httpx.Client, server: BackgroundServer) -> None:
    big = b'{"model": "tiny", "prompt": "' + b"a" * BODY_LIMIT + b'"}'
    t0 = time.monotonic()
    _assert_openai_error(http.post(C, content=big, headers={"Content-Type": "application/json"}), 413)

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    _assert_openai_error(http.post(C, content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert time.monotonic() - t0 < FAST_S
    just_under = b'{"model": "tiny", "max_tokens": 1, "prompt": "' + b"ab " * ((BODY_LIMIT - 200) // 3) + b'"}'
    _assert_openai_error(http.post(C, content=just_under, headers={"Content-Type": "application/json"}), 400)  # over max_model_len
    _healthy_and_serving(http, server)


def test_preprocessing_stays_off_the_event_loop(http: httpx.Client, server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing and tokenizing run on the preprocessing pool: while one request's preparation takes 2 s,
    /health still answers at once."""
    prepare = server.serving.prepare_completion

    def slow_prepare(req: Any) -> Any:
        time.sleep(2.0)  # blocks its thread, as a long tokenization would
        return prepare(req)

    monkeypatch.setattr(server.serving, "prepare_completion", slow_prepare)
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.update(r=http.post(C, json={"model": MODEL, "prompt": "hi", "max_tokens": 2})))
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert http.get("/health").status_code == 200
    assert time.monotonic() - t0 < 0.5, "the event loop was blocked by a request's preparation"
    t.join(30)
    assert done["r"].status_code == 200


def test_request_chat_template_is_bounded_when_trusted(http: httpx.Client, server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.serving, "trust_request_chat_template", True)
    ok = http.post(TOK, json={"model": MODEL, "messages": MSGS, "chat_template": "<{{ messages[0]['content'] }}>", "add_special_tokens": False})
    assert ok.status_code == 200, ok.text
    assert http.post("/detokenize", json={"model": MODEL, "tokens": ok.json()["tokens"]}).json()["prompt"] == "<hi>"
    forever = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    big = "{% for i in range(5000) %}{{ 'xxxxxxxxxx' }}{% endfor %}"  # 50k characters: over the 64 per token of 512 tokens, quick to render
    for template, param in ((forever, "chat_template"), (big, "messages")):
        t0 = time.monotonic()
        _assert_openai_error(http.post(CHAT, json={"model": MODEL, "messages": MSGS, "chat_template": template, "max_tokens": 1}), 400, param)
        assert time.monotonic() - t0 < FAST_S
    _healthy_and_serving(http, server)


def test_a_request_that_fails_in_the_step_fails_alone(http: httpx.Client, server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """If a bad request slips past validation (disabled here) and its step inputs cannot be built, that
    request ends with a 500 (stream: an error event) while the others finish and the engine stays up."""
    core = server.engine.core
    free_before = core.kv_cache_manager.num_free_pages
    monkeypatch.setattr(core, "validate_prompt", lambda ids, params: None)
    slow_down_steps(server.engine, monkeypatch)
    good: dict[str, Any] = {}
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    t = threading.Thread(target=lambda: good.update(r=http.post(C, json=body)))
    t.start()
    time.sleep(0.2)
    too_many_biases = {str(i): 1.0 for i in range(301)}  # the step tensors hold at most 300 per row
    bad = http.post(C, json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, "logit_bias": too_many_biases})
    err = _assert_openai_error(bad, 500)
    assert "logit_bias" in err["message"]
    with http.stream("POST", CHAT, json={"model": MODEL, "messages": MSGS, "max_tokens": 4, "stream": True, "logit_bias": too_many_biases}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert any('"error"' in line and "logit_bias" in line for line in lines) and lines[-1] == "data: [DONE]", lines
    t.join(60)
    assert good["r"].status_code == 200 and good["r"].json()["usage"]["completion_tokens"] == 24
    assert server.engine.healthy
    monkeypatch.undo()
    _healthy_and_serving(http, server)
    assert core.kv_cache_manager.num_free_pages == free_before
    assert not core.scheduler.has_unfinished_requests() and not core.output_processor.child_ids("nothing")


def test_a_request_whose_sampling_goes_non_finite_fails_alone(http: httpx.Client, server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the float32-safety bound lifted, a repetition penalty of 1e-38 turns the logits into inf/NaN
    and the sampler returns no valid token: that request fails (500), the engine goes on."""
    from jengine import sampling_params

    monkeypatch.setattr(sampling_params, "MIN_REPETITION_PENALTY", 0.0)
    bad = http.post(C, json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 1.0, "seed": 1, "repetition_penalty": 1e-38})
    err = _assert_openai_error(bad, 500)
    assert "invalid token id" in err["message"]
    assert server.engine.healthy
    _healthy_and_serving(http, server)
    assert not server.engine.core.scheduler.has_unfinished_requests()


def test_still_healthy_after_everything(http: httpx.Client, server: BackgroundServer) -> None:
    _healthy_and_serving(http, server)


# ----- API keys: flag, environment, file ---------------------------------------------------------------
def test_api_keys_from_flag_env_and_file(tmp_path: Any) -> None:
    from jengine.server.api_server import API_KEY_ENV, resolve_api_keys

    key_file = tmp_path / "keys"
    key_file.write_text("# operators' keys\nsk-file-1\n\n  sk-file-2  \nsk-flag\n")
    keys = resolve_api_keys(["sk-flag"], str(key_file), {API_KEY_ENV: " sk-env "})
    assert keys == ("sk-flag", "sk-env", "sk-file-1", "sk-file-2")
    assert resolve_api_keys([], None, {API_KEY_ENV: ""}) == ()
    assert resolve_api_keys([], None, {}) == ()
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        resolve_api_keys([], str(tmp_path / "empty"), {})
    with pytest.raises(ValueError, match="cannot be read"):
        resolve_api_keys([], str(tmp_path / "missing"), {})


def test_serve_fails_fast_on_a_bad_key_file(capsys: pytest.CaptureFixture, tmp_path: Any) -> None:
    from jengine.cli import main

    t0 = time.monotonic()  # the model folder exists (a missing model is reported first), the key file does not
    assert main(["serve", str(tmp_path), "--api-key-file", "/nonexistent/keys"]) == 2
    assert "--api-key-file" in capsys.readouterr().err and time.monotonic() - t0 < 5


def test_env_key_guards_the_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """`jengine serve` with only $JENGINE_API_KEY set: the settings carry that key and /v1/* needs it."""
    from jengine.cli import build_parser
    from jengine.server import api_server

    monkeypatch.setenv("JENGINE_API_KEY", "sk-from-env")
    captured: dict[str, Any] = {}
    monkeypatch.setattr(api_server, "serve", lambda engine_args, settings, **kw: captured.update(settings=settings) or 0)
    ns = build_parser().parse_args(["serve", str(tmp_path)])
    assert ns.func(ns) == 0
    assert tuple(captured["settings"].api_keys) == ("sk-from-env",)


# ----- a client that goes away frees its pages within one step -----------------------------------------
def _assert_freed_within_one_step(server: BackgroundServer, watch: StepWatch, free_before: int, closed_at: float) -> None:
    core = server.engine.core
    assert eventually(lambda: bool(watch.freed) and not core.scheduler.has_unfinished_requests(), interval=0.02), "the request kept running"
    assert len(watch.asked) == 1 and watch.asked.keys() == watch.freed.keys()
    rid = next(iter(watch.asked))
    assert watch.freed[rid] - watch.asked[rid] <= 1, (watch.asked, watch.freed)
    assert core.kv_cache_manager.num_free_pages == free_before
    assert server.engine.num_pending_requests == 0
    assert time.monotonic() - closed_at < 5.0


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_pages_within_one_step(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    slow_down_steps(server.engine, monkeypatch)
    watch = StepWatch(server.engine, monkeypatch)
    free_before = server.engine.core.kv_cache_manager.num_free_pages
    body = {"model": MODEL, "prompt": "Hello there, " * 20, "max_tokens": MAX_MODEL_LEN - 200, "n": 2, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(30.0, read=1.0)) as c:
        if stream:
            with c.stream("POST", C, json=body) as r:
                lines = r.iter_lines()
                assert all(next(lines) is not None for _ in range(4))
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s without an answer
                c.post(C, json=body)
    closed_at = time.monotonic()
    assert watch.min_free_pages < free_before  # the request did hold pages while its client was there
    _assert_freed_within_one_step(server, watch, free_before, closed_at)


# ----- admission: a flood beyond --max-pending-requests -------------------------------------------------
def test_flood_beyond_max_pending_gets_fast_503_with_retry_after(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """40 clients at once against --max-pending-requests 4: the pending count never passes 4, every
    refusal is a quick 503 with Retry-After, and every admitted request finishes completely."""
    import concurrent.futures

    limit, clients, max_tokens = 4, 40, 12
    engine = server.engine
    monkeypatch.setattr(engine, "max_pending_requests", limit)
    slow_down_steps(engine, monkeypatch, 0.03)
    most_pending = 0
    step = engine.core.step

    def watching_step() -> Any:
        nonlocal most_pending
        most_pending = max(most_pending, engine.num_pending_requests)
        return step()

    monkeypatch.setattr(engine.core, "step", watching_step)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, limits=limits)

    def one(i: int) -> tuple[httpx.Response, float]:
        body = {"model": MODEL, "prompt": f"Flood {i}", "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": i % 2 == 0}
        t0 = time.monotonic()
        r = client.post(C, json=body)
        return r, time.monotonic() - t0

    with client, concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients), timeout=120))
    ok = [(r, s) for r, s in results if r.status_code == 200]
    refused = [(r, s) for r, s in results if r.status_code == 503]
    assert len(ok) + len(refused) == clients, [r.status_code for r, _ in results]
    assert len(ok) >= limit and refused, (len(ok), len(refused))
    assert most_pending <= limit
    for r, seconds in refused:
        err = _assert_openai_error(r, 503)
        assert err["type"] == "ServiceUnavailableError" and r.headers["Retry-After"] == "1"
        assert seconds < 2.0, "a refusal must not wait for the queue"
    for r, _ in ok:  # every admitted request finished completely
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in r.text
        else:
            assert r.json()["usage"]["completion_tokens"] == max_tokens
    monkeypatch.undo()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        _healthy_and_serving(c, server)


def test_requests_in_preparation_count_toward_the_limit(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-pending-requests also bounds requests still being parsed and tokenized: past it, a new
    request is refused before its body is read, so a flood cannot pile up work in front of the engine."""
    monkeypatch.setattr(server.engine, "max_pending_requests", 1)
    prepare = server.serving.prepare_completion
    monkeypatch.setattr(server.serving, "prepare_completion", lambda req: (time.sleep(1.5), prepare(req))[1])
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        done: dict[str, Any] = {}
        t = threading.Thread(target=lambda: done.update(r=c.post(C, json={"model": MODEL, "prompt": "hi", "max_tokens": 2})))
        t.start()
        assert eventually(lambda: server.serving._preparing == 1, 5)
        t0 = time.monotonic()
        r = c.post(C, json={"model": MODEL, "prompt": "x" * 30000, "max_tokens": 2})
        err = _assert_openai_error(r, 503)
        assert time.monotonic() - t0 < 1.0 and r.headers["Retry-After"] == "1" and "limit" in err["message"]
        t.join(30)
        assert done["r"].status_code == 200
