"""`jengine serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn) and the gRPC server, one process.

    app = build_app(serving, metrics, api_keys=["sk-..."])      # the FastAPI app, for embedding
    asyncio.run(run_servers(engine, settings))                 # HTTP + gRPC on one event loop
    with BackgroundServer(engine, settings) as srv: ...         # the same on a thread (tests, notebooks)

Both frontends run on one asyncio loop and share one `AsyncEngine` (whose device loop is its own
thread). Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}` with 400 for
invalid requests (malformed JSON and type errors included, which FastAPI would answer with 422),
401 for a missing or wrong API key on `/v1/*` (compared in constant time), 404 for an unknown model
or route, 413 for a body over `max_request_body_bytes`, 500 when the engine loop has died (and
`/health` answers 503; `jengine serve` then exits with status 1 so an orchestrator restarts it), 503 with `Retry-After` when it is overloaded. Request bodies are parsed,
tokenized and rendered on `OpenAIServing`'s thread pool, never on the event loop. A client that
disconnects (streaming or not) aborts its request at the next engine step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

import jengine
from jengine.engine.async_engine import AsyncEngine

from .guards import BodySizeLimitMiddleware, error_response, json_response
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_request,
                       specialize_schema, validation_error)
from .serving import DEFAULT_CHAT_TEMPLATE_TIMEOUT_S, OpenAIServing

logger = logging.getLogger("jengine.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_REQUEST_BODY_BYTES = 8 * 2**20
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
ENGINE_DIED_EXIT_STATUS = 1  # `jengine serve` after its engine loop died (3 when a multi-host peer died)
ENGINE_DEATH_GRACE_S = 1.0  # between the death and closing the servers, so error responses go out


@dataclasses.dataclass
class ServerSettings:
    """What the serve-only CLI flags configure."""

    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: Optional[int] = None  # None: no gRPC server; 0: a free port
    api_keys: Sequence[str] = ()
    served_model_names: Sequence[str] = ()  # empty: derived from the model path
    model_path: Optional[str] = None
    chat_template: Optional[str] = None  # a file path or the template text
    uvicorn_log_level: str = "info"
    trust_request_chat_template: bool = False  # accept `chat_template` in requests (it runs on the server)
    chat_template_timeout_s: float = DEFAULT_CHAT_TEMPLATE_TIMEOUT_S  # rendering longer than this is a 400
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES  # 413 beyond
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S  # SIGTERM: finish in-flight requests for up to this long
    enable_auto_tool_choice: bool = False  # tool_choice "auto": the parser finds calls in free text
    tool_call_parser: Optional[str] = None  # a name in server.tool_parsers.TOOL_PARSERS
    reasoning_parser: Optional[str] = None  # a name in server.reasoning_parsers.REASONING_PARSERS
    lora_modules: Sequence[tuple[str, str]] = ()  # (name, adapter folder) served from the start (--lora-modules)
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter


API_KEY_ENV = "JENGINE_API_KEY"


def resolve_api_keys(flag_keys: Sequence[str] = (), key_file: Optional[str] = None,
                     environ: Optional[dict[str, str]] = None) -> tuple[str, ...]:
    """The API keys from `--api-key` (visible in `ps`), `$JENGINE_API_KEY` and `--api-key-file` (one key
    per line; blank lines and `#` comments skipped), all of them valid, in that order. ValueError for an
    unreadable or empty key file."""
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in flag_keys]
    keys.append(env.get(API_KEY_ENV, "").strip())
    if key_file is not None:
        try:
            with open(key_file, encoding="utf-8") as f:
                from_file = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except OSError as e:
            raise ValueError(f"--api-key-file {key_file!r} cannot be read: {e.strerror}") from None
        if not from_file:
            raise ValueError(f"--api-key-file {key_file!r} holds no key")
        keys += from_file
    return tuple(dict.fromkeys(k for k in keys if k))


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """`--chat-template` takes a file path or the Jinja text itself (as vLLM's does)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def check_parser_settings(settings: ServerSettings) -> None:
    """ValueError for tool / reasoning parser flags that do not fit (before the slow engine start)."""
    from .reasoning_parsers import get_reasoning_parser
    from .tool_parsers import get_tool_parser

    if settings.enable_auto_tool_choice and not settings.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    if settings.tool_call_parser:
        get_tool_parser(settings.tool_call_parser)
    if settings.reasoning_parser:
        get_reasoning_parser(settings.reasoning_parser)


def default_model_names(model_path: Optional[str]) -> list[str]:
    if not model_path:
        return [DEFAULT_MODEL_NAME]
    return [model_path]


_json = json_response
_error = error_response


async def _listen_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _with_cancellation(request: Request, work: Awaitable[Any]) -> Any:
    """Runs `work` but cancels it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_listen_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    try:
        await task
    except BaseException:  # noqa: BLE001 - the client is gone; nothing to answer
        pass
    return None


class _APIKeyMiddleware:
    """Pure ASGI middleware (no body buffering, disconnects pass through) guarding `/v1/*` with API keys."""

    def __init__(self, app: Any, keys: Sequence[bytes]) -> None:
        self.app = app
        self.keys = list(keys)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1"):
            header = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    header = value
                    break
            given = header[7:].strip() if header[:7].lower() == b"bearer " else b""
            ok = False
            for key in self.keys:  # no early exit: the time taken does not say which key matched
                ok |= hmac.compare_digest(given, key)
            if not ok:
                response = _error(APIError(401, "Missing or invalid API key: pass `Authorization: Bearer <key>`.", code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(serving: OpenAIServing, metrics: ServerMetrics, *, api_keys: Sequence[str] = (),
              max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES, allow_runtime_lora_updating: bool = False) -> FastAPI:
    """The FastAPI app over `serving`; `api_keys` (any of them) guard `/v1/*`; bodies over
    `max_request_body_bytes` get 413; `allow_runtime_lora_updating` adds vLLM's LoRA load/unload endpoints."""
    app = FastAPI(title="jengine", version=jengine.__version__, docs_url=None, redoc_url=None)
    keys = [k.encode() for k in api_keys]
    engine = serving.engine

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_body_bytes)
    if keys:  # added last, so outermost: a request without a valid key is refused before its body is read
        app.add_middleware(_APIKeyMiddleware, keys=keys)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(_: Request, e: RequestValidationError) -> Response:
        return _error(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        return _error(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> Response:
        logger.exception("unhandled error")
        return _error(APIError(500, f"internal error: {e!r}"))

    async def _respond(request: Request, handler: Callable[[], Awaitable[Any]]) -> Any:
        result = await _with_cancellation(request, handler())
        if result is None:
            return Response(status_code=499)  # client closed the request; nobody reads this
        if isinstance(result, dict):
            return _json(result)
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _parse(request: Request, cls: type) -> Any:
        """The request model from the body, parsed on the preprocessing pool (the body is read first,
        under the size limit, so nothing else reads from the connection meanwhile)."""
        if cls in (CompletionRequest, ChatCompletionRequest):
            serving.check_admitting()
            serving.check_capacity()
        raw = await request.body()
        return await serving.run_sync(parse_request, cls, raw)

    def _body(cls: type) -> dict[str, Any]:  # the request model in the OpenAPI schema (the body is parsed by hand)
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{cls.__name__}"}}}}}

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest))
    async def completions(request: Request) -> Any:
        body = await _parse(request, CompletionRequest)
        return await _respond(request, lambda: serving.create_completion(body))

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Any:
        body = await _parse(request, ChatCompletionRequest)
        return await _respond(request, lambda: serving.create_chat_completion(body))

    @app.get("/v1/models")
    async def models() -> Any:
        return _json(serving.list_models())

    if allow_runtime_lora_updating:
        async def _lora_body(request: Request) -> dict[str, Any]:
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError as e:
                raise APIError(400, f"the request body is not valid JSON: {e}") from e
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object")
            return body

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request) -> Response:
            body = await _lora_body(request)
            lora = await serving.run_sync(serving.loras.load, body.get("lora_name"), body.get("lora_path"))
            logger.info("loaded LoRA adapter %r from %s", lora.lora_name, lora.lora_path)
            return Response(f"Success: LoRA adapter '{lora.lora_name}' added successfully.", media_type="text/plain")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request) -> Response:
            body = await _lora_body(request)
            lora = serving.loras.unload(body.get("lora_name"))
            logger.info("unloaded LoRA adapter %r", lora.lora_name)
            return Response(f"Success: LoRA adapter '{lora.lora_name}' removed successfully.", media_type="text/plain")

    @app.post("/tokenize", openapi_extra=_body(TokenizeRequest))
    async def tokenize(request: Request) -> Any:
        body = await _parse(request, TokenizeRequest)
        return _json(await serving.run_sync(serving.tokenize, body))

    @app.post("/detokenize", openapi_extra=_body(DetokenizeRequest))
    async def detokenize(request: Request) -> Any:
        body = await _parse(request, DetokenizeRequest)
        return _json(await serving.run_sync(serving.detokenize, body))

    @app.get("/health")
    async def health() -> Response:  # 503 once the engine died, and while draining (readiness: send no more)
        return Response(status_code=200 if engine.healthy and not serving.draining else 503)

    @app.get("/version")
    async def version() -> Any:
        return _json({"version": jengine.__version__})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    _add_request_schemas(app, serving, (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest))
    return app


def _add_request_schemas(app: FastAPI, serving: OpenAIServing, models: Sequence[type[BaseModel]]) -> None:
    """Puts the request models (and the models they use) into the OpenAPI components, where the
    endpoints' `$ref`s point (the bodies are parsed by hand, so FastAPI does not list them itself), with
    the bounds of this model and these flags filled in."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            specialize_schema(components, model_names=serving.served_model_names, vocab_size=serving.vocab_size,
                              max_model_len=serving.max_model_len, max_logprobs=serving.max_logprobs,
                              trust_request_chat_template=serving.trust_request_chat_template,
                              auto_tool_choice=serving.enable_auto_tool_choice)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def make_serving(engine: AsyncEngine, settings: ServerSettings) -> tuple[OpenAIServing, ServerMetrics]:
    names = list(settings.served_model_names) or default_model_names(settings.model_path)
    serving = OpenAIServing(engine, names, model_path=settings.model_path or names[0], chat_template=load_chat_template(settings.chat_template),
                            trust_request_chat_template=settings.trust_request_chat_template,
                            chat_template_timeout_s=settings.chat_template_timeout_s,
                            enable_auto_tool_choice=settings.enable_auto_tool_choice, tool_call_parser=settings.tool_call_parser,
                            reasoning_parser=settings.reasoning_parser)
    for name, path in settings.lora_modules:  # --lora-modules: read and checked before the server listens
        try:
            serving.loras.load(name, path)
        except APIError as e:
            raise ValueError(f"--lora-modules {name}={path}: {e.message}") from None
    metrics = ServerMetrics(serving.model_name)
    metrics.attach(engine)
    return serving, metrics


async def run_servers(engine: AsyncEngine, settings: ServerSettings, *, started: Optional[Callable[[Any], None]] = None,
                      stop: Optional[asyncio.Event] = None) -> None:
    """Serves HTTP (and gRPC when `grpc_port` is set) until `stop` is set or uvicorn is told to exit.
    `started(info)` is called once both listen, with `info.port` / `info.grpc_port` bound."""
    import uvicorn

    serving, metrics = make_serving(engine, settings)
    app = build_app(serving, metrics, api_keys=settings.api_keys, max_request_body_bytes=settings.max_request_body_bytes,
                    allow_runtime_lora_updating=settings.allow_runtime_lora_updating)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.uvicorn_log_level,
                            lifespan="off", timeout_graceful_shutdown=5)
    http = uvicorn.Server(config)
    grpc_server = None
    info = _Bound()
    if settings.grpc_port is not None:
        from .grpc_server import start_grpc_server

        grpc_server, info.grpc_port = await start_grpc_server(serving, settings.host, settings.grpc_port)
        logger.info("gRPC server on %s:%d", settings.host, info.grpc_port)
    serve_task = asyncio.ensure_future(http.serve())
    loop = asyncio.get_running_loop()
    drain_asked = asyncio.Event()
    drainer = asyncio.ensure_future(_drain_when_asked(drain_asked, serving, http, grpc_server, settings.shutdown_timeout_s))
    previous_sigterm = None
    try:
        while not http.started:
            if serve_task.done():
                serve_task.result()  # raises the start-up error
                raise OSError(f"the HTTP server did not start on {settings.host}:{settings.port}")
            await asyncio.sleep(0.02)
        info.port = http.servers[0].sockets[0].getsockname()[1]
        info.http = http
        info.serving = serving
        info.drain = drain = lambda: loop.call_soon_threadsafe(drain_asked.set)
        if threading.current_thread() is threading.main_thread():  # `jengine serve`: SIGTERM drains (uvicorn's handler stops at once)
            previous_sigterm = signal.signal(signal.SIGTERM, lambda *_: drain())
        logger.info("HTTP server on http://%s:%d (model %s)", settings.host, info.port, serving.model_name)
        if started is not None:
            started(info)
        if stop is None:
            await serve_task
        else:
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({serve_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            http.should_exit = True
            await serve_task
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        drainer.cancel()
        if not serve_task.done():
            http.should_exit = True
            await asyncio.wait({serve_task}, timeout=10)
        if grpc_server is not None:
            await grpc_server.stop(grace=1)
        serving.close()


async def _drain_when_asked(asked: asyncio.Event, serving: OpenAIServing, http: Any, grpc_server: Any, timeout_s: float) -> None:
    """Graceful shutdown (SIGTERM): stop admitting (new requests 503, `/health` 503, gRPC health
    NOT_SERVING), let the requests in flight finish for up to `timeout_s`, end those still running with
    an error, then stop the HTTP server. A second signal stops waiting at once."""
    await asked.wait()
    asked.clear()
    serving.draining = True
    if grpc_server is not None:
        await grpc_server.mark_not_serving()
    engine = serving.engine
    logger.info("draining: refusing new requests, waiting up to %.0f s for %d in flight", timeout_s, engine.num_pending_requests)
    deadline = time.monotonic() + timeout_s
    while engine.num_pending_requests and time.monotonic() < deadline and not asked.is_set() and engine.healthy:
        await asyncio.sleep(0.05)
    if engine.num_pending_requests:
        # Stopping the engine ends each of them with an error (HTTP 500, an error event in a stream,
        # gRPC UNAVAILABLE) at the next step boundary, rather than leaving them for uvicorn to cut.
        logger.warning("drain ended with %d request(s) still in flight: they end with an error", engine.num_pending_requests)
        engine.shutdown(timeout=0)
    else:
        logger.info("drained: no request in flight")
    http.should_exit = True


@dataclasses.dataclass
class _Bound:
    port: int = 0
    grpc_port: Optional[int] = None
    http: Any = None
    serving: Optional[OpenAIServing] = None
    drain: Optional[Callable[[], Any]] = None  # thread-safe: begin a graceful shutdown


class BackgroundServer:
    """Runs `run_servers` on a daemon thread with its own event loop (tests, notebooks).

    `port=0` / `grpc_port=0` in the settings pick free ports; read them from `.port` / `.grpc_port`."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, start_timeout: float = 60.0) -> None:
        self.engine = engine
        self.settings = settings
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._info: Optional[_Bound] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=self._main, name="jengine-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout):
            raise TimeoutError("the server did not start in time")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def started(info: _Bound) -> None:
                self._info = info
                self._ready.set()

            await run_servers(self.engine, self.settings, started=started, stop=self._stop)

        try:
            asyncio.run(body())
        except BaseException as e:  # noqa: BLE001 - surfaced to the constructor
            self._error = e
        finally:
            self._ready.set()

    @property
    def port(self) -> int:
        assert self._info is not None
        return self._info.port

    @property
    def grpc_port(self) -> Optional[int]:
        assert self._info is not None
        return self._info.grpc_port

    @property
    def serving(self) -> OpenAIServing:
        """The request handlers (tests adjust their limits)."""
        assert self._info is not None and self._info.serving is not None
        return self._info.serving

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def drain(self) -> None:
        """What SIGTERM does to `jengine serve`: refuse new requests, finish those in flight (for up to
        `shutdown_timeout_s`), then stop."""
        assert self._info is not None and self._info.drain is not None
        self._info.drain()

    def stop(self, timeout: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(engine_args: Any, settings: ServerSettings, *, log_requests: bool = True, max_pending_requests: Optional[int] = None) -> int:
    """The `jengine serve` entry point: build the engine (compiles), then serve until interrupted."""
    if not 0 <= settings.port < 65536 or (settings.grpc_port is not None and not 0 <= settings.grpc_port < 65536):
        raise ValueError("ports must be in [0, 65535]")
    load_chat_template(settings.chat_template)  # fail before the slow engine start
    check_parser_settings(settings)
    if settings.reasoning_parser and engine_args.reasoning_parser != settings.reasoning_parser:
        raise ValueError(f"the engine's reasoning_parser ({engine_args.reasoning_parser!r}) must be the server's "
                         f"({settings.reasoning_parser!r}): structured outputs then constrain only the answer")
    config = engine_args.create_engine_config()  # validates every engine flag before loading anything
    from jengine.engine.core import EngineCore

    core = EngineCore(config)
    if core.is_worker:  # multi-host: workers run the leader's steps and serve no frontend
        return core.run_worker()
    engine = AsyncEngine(core, log_requests=log_requests, max_pending_requests=max_pending_requests)
    if settings.model_path is None:
        settings.model_path = engine_args.model
    from jengine.sharding import distributed

    crashed = threading.Event()
    stop_soon: list[Callable[[], Any]] = []  # set once the event loop runs

    def on_death() -> None:  # engine thread
        if not engine.crashed:
            return
        crashed.set()
        logger.error("the engine loop died (%r): exiting with status %d once in-flight requests have their errors",
                     engine.dead_error, _exit_status(engine))
        for stop in stop_soon:
            stop()

    async def main() -> None:
        loop, stop = asyncio.get_running_loop(), asyncio.Event()

        def later() -> None:
            loop.call_later(ENGINE_DEATH_GRACE_S, stop.set)

        stop_soon.append(lambda: loop.call_soon_threadsafe(later))
        if not engine.healthy:  # died while the loop was starting
            later()
        await run_servers(engine, settings, stop=stop)

    engine.add_death_callback(on_death)
    if config.parallel.num_processes > 1:
        distributed.add_fatal_hook(lambda message: _fail_stuck_engine(engine, message))
    peer_failed = False
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
        peer_failed = isinstance(engine.dead_error, distributed.WorkerFailedError)
        if not peer_failed:  # telling dead workers to stop would wait for them
            core.shutdown()
    if peer_failed:  # skip JAX's shutdown barrier, which would wait for the dead peer and then abort
        distributed.exit_after_peer_failure(distributed.EXIT_WORKER_FAILED)
    return _exit_status(engine) if crashed.is_set() else 0


def _exit_status(engine: AsyncEngine) -> int:
    from jengine.sharding import distributed

    return distributed.EXIT_WORKER_FAILED if isinstance(engine.dead_error, distributed.WorkerFailedError) else ENGINE_DIED_EXIT_STATUS


def _fail_stuck_engine(engine: AsyncEngine, message: str) -> None:
    """Multi-host fatal hook (the step watchdog fired: the engine thread is stuck in a collective with a
    dead peer): end every request with the error, give the responses a moment to go out; the caller
    then exits with status 3."""
    from jengine.sharding import distributed

    engine.kill(distributed.WorkerFailedError(message))
    time.sleep(ENGINE_DEATH_GRACE_S)


__all__ = ["BackgroundServer", "ServerSettings", "build_app", "make_serving", "run_servers", "serve"]
