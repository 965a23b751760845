"""What exo's ChatGPT API lets through, narrowed to safe defaults (installed by the launcher on exo's aiohttp app).

exo serves every route on 0.0.0.0 without authentication, echoes any CORS origin with credentials, and accepts
any content type, so any web page a user opens could stop the node (`POST /quit`) or delete models. Here:

* `--api-key KEY` (or EXO_RKNPU_API_KEY): every request must carry `Authorization: Bearer KEY` (what OpenAI
  clients send) or `X-Api-Key: KEY`, compared in constant time; else 401. CORS preflights (OPTIONS) of a
  configured origin pass, as browsers send them without credentials.
* a request with an `Origin` header that is neither this server nor a `--cors-origin` gets 403 (a browser always
  sends Origin on a cross-site POST, so no page can drive the node); CORS headers go only to configured origins.
* a POST with a body must be `Content-Type: application/json` (415): a `text/plain` "simple request" is how a web
  page reaches an API without a preflight (an empty POST carries nothing to misread; Origin covers pages).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Awaitable, Callable

from aiohttp import http_exceptions, web

from exo_rknpu.exo.chat_request import error_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guard_middleware(api_key: str | None, cors_origins: tuple[str, ...]) -> Any:
    """The aiohttp middleware enforcing the rules above."""
    key = api_key.encode() if api_key else None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and origin not in cors_origins and not same_origin(request, origin):
            return _error(403, "forbidden", f"requests from web origin {origin} are not allowed (start the node with "
                                            "--cors-origin ORIGIN to allow one)")
        if key is not None and not (request.method == "OPTIONS" and origin in cors_origins):
            if not hmac.compare_digest(presented_key(request), key):
                return _error(401, "invalid_api_key", "this API needs an API key: send 'Authorization: Bearer KEY'",
                              {"WWW-Authenticate": 'Bearer realm="exo-rknpu"'})
        if request.method == "POST" and request.body_exists:
            if request.content_type != "application/json":
                return _error(415, "invalid_request_error",
                              f"send the body as Content-Type: application/json (got {request.content_type!r})")
        return await handler(request)

    return guard


def presented_key(request: web.Request) -> bytes:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip().encode()
    return request.headers.get("X-Api-Key", "").strip().encode()


def same_origin(request: web.Request, origin: str) -> bool:
    return origin in (f"{request.scheme}://{request.host}", f"http://{request.host}", f"https://{request.host}")


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, kind, status), status=status, headers=headers)


class CorsShim:
    """Stands in for the aiohttp_cors module in exo's API: exo registers every route with `{"*": credentials}`;
    this registers CORS only for the configured origins, without credentials (none: no CORS headers at all)."""

    def __init__(self, real: Any, origins: tuple[str, ...]) -> None:
        self._real, self._origins = real, origins
        self.ResourceOptions = real.ResourceOptions

    def setup(self, app: web.Application, **_: Any) -> Any:
        cors = self._real.setup(app) if self._origins else None
        origins = self._origins
        real = self._real

        class Registrar:
            def add(self, route: Any, _exo_options: Any = None) -> Any:
                if cors is None:
                    return route
                opts = real.ResourceOptions(allow_credentials=False, expose_headers="*",
                                            allow_headers=("Content-Type", "Authorization", "X-Api-Key"),
                                            allow_methods="*")
                return cors.add(route, {o: opts for o in origins})

        return Registrar()


def turned_off(option: str) -> Handler:
    """A handler for a route that changes the node and is off unless `option` is given."""

    async def handler(request: web.Request) -> web.Response:
        return _error(403, "forbidden", f"{request.method} {request.path} changes this node and is turned off; "
                                        f"start the node with {option} to allow it")

    return handler


class _OneLineParseErrors(logging.Filter):
    """aiohttp logs every malformed HTTP request as "Error handling request" with a traceback: keep one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, http_exceptions.HttpProcessingError):
            record.msg, record.args = f"malformed HTTP request refused: {type(exc).__name__}: {exc.message}", ()
            record.exc_info, record.exc_text = None, None
        return True


def quiet_aiohttp_logs() -> None:
    """Install the filter above on aiohttp's server logger (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _OneLineParseErrors) for f in logger.filters):
        logger.addFilter(_OneLineParseErrors())
