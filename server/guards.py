"""Bounds on what one request can make the server do: body size, template rendering time, text it cannot encode.

    app = BodySizeLimitMiddleware(app, max_bytes)        # 413 over the limit, before the body is read
    text = call_with_deadline(render, 5.0)               # RenderTimeout once 5 s of Python code have passed
    check_text(prompt, "prompt")                         # 400 for text with lone surrogates

Rendering runs on a worker thread, so a deadline measured from outside could not stop it (Python threads
cannot be killed, and a runaway Jinja loop holds the GIL). `call_with_deadline` installs a trace function
on its own thread that raises once the deadline has passed: Jinja compiles templates to Python, so
every template line and every call it makes checks the clock, and the render stops where it is.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.responses import Response

from jengine.tokenizer import check_encodable

from .protocol import APIError

T = TypeVar("T")

TEMPLATE_FILENAME = "<template>"  # the code filename of templates Jinja compiles from a string


class RenderTimeout(BaseException):
    """Raised inside a traced call past its deadline. A BaseException, so no `except Exception` in the
    code being traced (Jinja's runtime, a template's own error handling) can swallow it."""


def call_with_deadline(fn: Callable[..., T], seconds: float, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on this thread, stopped with `RenderTimeout` after `seconds` of Python code.

    Every Python call made inside checks the clock, and so does every line of template code (Jinja's
    compiled templates), so loops in a template stop too. A single long C call (one huge string
    multiplication) cannot be interrupted; only trusted templates can contain such expressions.
    """
    deadline = time.monotonic() + seconds

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise RenderTimeout(f"rendering took longer than {seconds:g} s")
        return tracer if frame.f_code.co_filename == TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return fn(*args, **kwargs)
    finally:
        sys.settrace(previous)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response; text the client sent that is not valid Unicode (echoed in an error message, say)
    comes back escaped rather than failing the response."""
    text = json.dumps(body, ensure_ascii=False, allow_nan=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = json.dumps(body, ensure_ascii=True, allow_nan=False).encode("ascii")
    return Response(data, status_code=status, media_type="application/json", headers=headers)


def error_response(error: APIError) -> Response:
    return json_response(error.body(), error.status, error.headers or None)


def check_text(text: str, param: str) -> None:
    """A 400 naming `param` when `text` cannot be encoded as UTF-8 (lone surrogates), which the
    tokenizer would otherwise fail on with an internal error."""
    try:
        check_encodable(text, param)
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: 413 for a request body over `max_bytes`, before reading it when the client
    declares its length, else as soon as the received bytes pass the limit (chunked uploads)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes (--max-request-body-bytes)",
                        code="request_too_large")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await error_response(self._too_large())(scope, receive, send)
                    return
                break
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # raised inside the endpoint's body read: answered by its error handler
            return message

        await self.app(scope, limited_receive, send)
