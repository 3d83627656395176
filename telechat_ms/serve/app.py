"""The FastAPI application: OpenAI-compatible routes, the released /generate, tokenize / detokenize, models,
health, Prometheus metrics, and the web page (GET / and /static from telechat_ms/serve/static).

Every error reaches the client as JSON {"error": {"message", "type", "param", "code"}}: validation errors name the
field (messages[0].role, max_tokens, ...), malformed JSON says so, unexpected exceptions are logged here and
answered 500 without a traceback. With an API key, /v1/*, /generate, /tokenize and /detokenize need
`Authorization: Bearer KEY` (401 otherwise); /health, /metrics and the page stay open.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from telechat_ms.serve import openai_chat, openai_completions, released
from telechat_ms.serve.metrics import CONTENT_TYPE
from telechat_ms.serve.protocol import APIError, DetokenizeRequest, TokenizeRequest, error_body
from telechat_ms.serve.state import (ServeState, check_model, check_token_ids, encode_text, render_chat, state_of,
                                     token_text)

log = logging.getLogger("telechat_ms.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _param(loc: tuple) -> str | None:
    """A pydantic error location as the request field it names: ('body', 'messages', 0, 'role') -> messages[0].role
    (union member tags such as 'list[int]' dropped)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not ("[" in part or "(" in part or part.lower() in _TYPE_TAGS
                                            or part.startswith(("function-", "json-or-python"))):
            out += f".{part}" if out else part
    return out or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON ({detail}).")
    if first["type"] == "missing" and tuple(first["loc"]) == ("body",):
        return APIError(400, "The request needs a JSON object body.")
    param = _param(tuple(first["loc"]))
    if first["type"] == "model_attributes_type" and param is None:
        return APIError(400, "The request body must be a JSON object.")
    messages = [e["msg"] for e in errors if _param(tuple(e["loc"])) == param]
    if first["type"] == "extra_forbidden":
        text = f"{param}: unknown field (not a parameter this server accepts)"
    elif len(messages) > 1:   # a union: none of the accepted shapes matched
        text = f"{param}: none of the accepted types matches ({'; '.join(dict.fromkeys(messages))})"
    else:
        text = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, text, param=param)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class PackageStatic(StaticFiles):
    """StaticFiles that answers a JSON 404 while the page directory is absent (instead of failing)."""

    async def __call__(self, scope, receive, send) -> None:
        if not os.path.isdir(self.directory):
            raise StarletteHTTPException(404, f"the web page is not installed ({self.directory} is missing)")
        await super().__call__(scope, receive, send)


def require_key(request: Request) -> None:
    """Dependency of the guarded routes: Authorization: Bearer <--api-key>."""
    key = state_of(request).api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Invalid or missing API key: send the header 'Authorization: Bearer <key>'.",
                       err_type="AuthenticationError", headers={"WWW-Authenticate": "Bearer"})


def _misc_routes(guarded: APIRouter, open_routes: APIRouter, static_dir: Path) -> None:
    @open_routes.get("/health")
    async def health(request: Request) -> Response:
        engine = state_of(request).engine
        if not engine.alive:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return JSONResponse({"code": 200})

    @open_routes.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(state_of(request).engine.metrics.render(), media_type=CONTENT_TYPE)

    @guarded.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        s = state_of(request)
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                            "owned_by": "telechat_ms", "root": s.model_dir, "parent": None,
                                            "max_model_len": s.max_model_len, "permission": []}]}

    @guarded.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
        s = state_of(request)
        check_model(s, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            messages = openai_chat.template_messages(req.messages)
            openai_chat.check_tools(req.tools)
            ids = await render_chat(s, messages, req.tools, req.add_generation_prompt)
        else:
            ids = await encode_text(s, req.prompt)
        strs = [token_text(s.tokenizer, ids[:i], t) for i, t in enumerate(ids)] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": s.max_model_len, "tokens": ids, "token_strs": strs}

    @guarded.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
        s = state_of(request)
        check_model(s, req.model)
        check_token_ids(s, req.tokens, "tokens")
        return {"prompt": s.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @open_routes.get("/", include_in_schema=False)
    async def index() -> Response:
        page = static_dir / "index.html"
        if not page.is_file():
            raise APIError(404, f"the web page is not installed ({page} is missing)")
        return FileResponse(page)


def create_app(state: ServeState, static_dir: str | os.PathLike | None = None) -> FastAPI:
    """The ASGI app over a running engine; the page and its files come from static_dir (the package's static/)."""
    static_dir = Path(static_dir) if static_dir is not None else STATIC_DIR
    app = FastAPI(title="telechat_ms serve", description="OpenAI-compatible TeleChat2 server", version="1")
    app.state.serve = state
    guarded = APIRouter(dependencies=[Depends(require_key)])
    open_routes = APIRouter()
    _misc_routes(guarded, open_routes, static_dir)
    for module in (openai_chat, openai_completions, released):
        guarded.include_router(module.router)
    app.include_router(guarded)
    app.include_router(open_routes)
    app.mount("/static", PackageStatic(directory=static_dir, check_dir=False), name="static")

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal server error ({type(exc).__name__}); see the server log"),
                            status_code=500)

    return app
