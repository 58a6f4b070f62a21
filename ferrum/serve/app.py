"""The ASGI app: routes, API-key check, error bodies, disconnects, lifecycle.

FastAPI on Starlette: Starlette's streaming response already watches for
the client going away and cancels the stream, which is what aborts a
request and frees its KV blocks; FastAPI adds routing and the OpenAPI page.
Request bodies are validated here with pydantic in JSON mode (not by
FastAPI's signature magic), so every malformed body gets an OpenAI-shaped
400 rather than FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response as HTTPResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ferrum.api import LLM
from ferrum.errors import ConfigError, FerrumError
from ferrum.sampling import SamplingParams
from ferrum.serve import handlers
from ferrum.serve.errors import APIError, validation_error
from ferrum.serve.generation import Generation
from ferrum.serve.handlers import ServerState
from ferrum.serve.metrics import CONTENT_TYPE, ServerMetrics
from ferrum.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from ferrum.serve.responses import ResponsesRequest, ResponseStore, input_item_list
from ferrum.serve.responses import create_response as create_response_for

#: Larger bodies are refused before they are parsed (a 1M-token prompt as JSON is ~8 MB).
MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """Server-level settings; the engine's own limits live in its EngineConfig."""

    model_names: tuple[str, ...]
    api_key: str | None = None
    max_queue: int = 256  # engine requests (choices) allowed to wait beyond max_num_seqs running
    reasoning_parser: str | None = None  # one of ferrum.serve.reasoning.PARSERS: thinking apart from the answer


def generation_defaults(folder: Path) -> dict[str, float]:
    """The checkpoint's recommended sampling (``generation_config.json``), used where a request says nothing (as
    vLLM takes them: temperature, top_p, top_k, min_p, repetition_penalty). A value sampling refuses (NaN, a
    top_p of -1, a top_k of 2.7) is left out with a warning naming the file: taken, it would fail every request
    that leaves the field unset, naming a field the client never sent."""
    path = folder / "generation_config.json"
    try:
        raw = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    kept = {}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = raw.get(key)
        if value is None:
            continue
        try:
            SamplingParams(**{key: value})
        except (FerrumError, TypeError, ValueError) as exc:
            warnings.warn(f"{path}: {key} {value!r} is left out of the requests' defaults: {exc}", stacklevel=2)
            continue
        kept[key] = value
    return kept


def create_app(llm: LLM, config: ServeConfig) -> FastAPI:
    """An app serving ``llm``; its engine thread stops (aborting what is left) when the app shuts down."""
    clash = sorted(set(config.model_names) & {a.name for a in llm.adapters})
    if clash:
        raise ConfigError(f"{', '.join(map(repr, clash))} names both the served model and a LoRA adapter, so requests "
                          "could not reach the adapter; give the adapter (--lora NAME=PATH) another name")
    engine = llm.async_engine
    state = ServerState(
        llm=llm, engine=engine, metrics=ServerMetrics(llm.engine), model_names=config.model_names,
        max_pending=llm.engine.config.max_num_seqs + config.max_queue,
        sampling_defaults=generation_defaults(llm.path), reasoning_parser=config.reasoning_parser,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Off the event loop, so the first response_format or forced tool call does not stall every stream.
        state.structured_ready = asyncio.get_running_loop().run_in_executor(None, llm.engine.prepare_structured_outputs)
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="Ferrum", lifespan=lifespan)
    app.state.ferrum = state

    # ----------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        state.metrics.rejected.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(error.status_code, str(error.detail)))

    @app.exception_handler(RequestValidationError)
    async def query_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"][1:]) or None  # past "query" / "path"
        return await api_error(request, APIError(400, f"{param}: {first['msg']}", param=param))

    @app.exception_handler(FerrumError)
    async def ferrum_error(request: Request, error: FerrumError) -> JSONResponse:
        return await api_error(request, APIError.from_ferrum(error))

    @app.exception_handler(Exception)  # a bug: still an OpenAI error body, not a bare "Internal Server Error"
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return await api_error(request, APIError.of(error))

    async def require_api_key(request: Request) -> None:
        if config.api_key is not None:
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            # The scheme is case-insensitive (RFC 9110 11.1); the key is compared in constant time whatever it is.
            if not hmac.compare_digest(key.strip().encode(), config.api_key.encode()) or scheme.lower() != "bearer":
                raise APIError(
                    401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'", code="invalid_api_key"
                )

    # ----------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> HTTPResponse:
        return HTTPResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "ferrum",
                "max_model_len": state.max_model_len}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.get("/models")
    async def list_models() -> dict:
        cards = [model_card(name) for name in state.model_names]
        cards += [{**model_card(name), "parent": state.model_names[0]} for name in state.adapter_names()]
        return {"object": "list", "data": cards}

    @v1.get("/models/{name:path}")
    async def get_model(name: str) -> dict:
        adapter = state.check_model(name)
        return model_card(name) if adapter is None else {**model_card(name), "parent": state.model_names[0]}

    @v1.post("/chat/completions")
    async def chat(request: Request) -> HTTPResponse:
        body = await _parse(request, ChatCompletionRequest)
        return await _reply(request, await handlers.chat_completion(state, body))

    @v1.post("/completions")
    async def completions(request: Request) -> HTTPResponse:
        body = await _parse(request, CompletionRequest)
        return await _reply(request, await handlers.completion(state, body))

    responses = ResponseStore()

    @v1.post("/responses")
    async def create_response(request: Request) -> HTTPResponse:
        body = await _parse(request, ResponsesRequest)
        return await _reply(request, await create_response_for(state, responses, body))

    @v1.get("/responses/{response_id}")
    async def get_response(response_id: str) -> dict:
        return responses.get(response_id)[0]

    @v1.get("/responses/{response_id}/input_items")
    async def list_input_items(response_id: str, limit: int = 20, order: str = "desc", after: str | None = None,
                               include: list[str] = Query([])) -> dict:
        if include:
            raise APIError(400, f"include {include} is not supported for input items", param="include")
        return input_item_list(responses.inputs(response_id), limit, order, after)

    @v1.delete("/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        responses.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    app.include_router(v1)

    extras = APIRouter(dependencies=[Depends(require_api_key)])  # vLLM's, beside the OpenAI API

    @extras.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        return await handlers.tokenize(state, await _parse(request, TokenizeRequest))

    @extras.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        return handlers.detokenize(state, await _parse(request, DetokenizeRequest))

    app.include_router(extras)
    return app


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # counted as it arrives: a chunked body declares no length
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # gone before its body was whole: no one to answer (nginx's 499, counted as such)
        raise APIError(499, "the client closed the connection before its request body was complete") from None
    raw = b"".join(chunks)
    try:
        body = model.model_validate_json(raw)  # a typed field's NaN is refused here, by name
    except ValidationError as error:
        errors = error.errors(include_url=False)
        mended = _lone_surrogates_replaced(raw) if errors and errors[0]["type"] == "json_invalid" else None
        if mended is None:
            raise validation_error(errors) from None
        try:
            body = model.model_validate_json(mended)
        except ValidationError as again:
            raise validation_error(again.errors(include_url=False)) from None
    if b"NaN" in raw or b"Infinity" in raw:  # cheap: most bodies hold neither word
        _refuse_non_finite(raw)
    return body


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogates_replaced(raw: bytes) -> bytes | None:
    """``raw`` with each unpaired UTF-16 surrogate escape (``"\\ud83d"``: valid JSON, which ``JSON.stringify`` and
    ``json.dumps`` write for a string cut inside an emoji, but no character, so no tokenizer takes it) as U+FFFD,
    wherever in the body it stands; None where there is none, or ``raw`` is not JSON anyway. Only a body pydantic's
    parser refused comes here: the others pay nothing."""
    if b"\\ud" not in raw.lower():
        return None
    try:
        value = json.loads(raw)
        mended = _mend(value)
    except (ValueError, RecursionError):
        return None
    return None if mended == value else json.dumps(mended, ensure_ascii=False).encode()


def _mend(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_mend(item) for item in value]
    if isinstance(value, dict):
        return {_mend(key): _mend(item) for key, item in value.items()}
    return value


def _refuse_non_finite(raw: bytes) -> None:
    """NaN and Infinity are not JSON, though parsers take them: typed numbers refuse them, but a free-form object
    (a tool's parameters, ``reasoning``) would carry one on, to a reply that cannot be written as JSON."""

    def refuse(constant: str) -> None:
        raise APIError(400, f"the request body holds {constant}, which is not a JSON number; send a finite number")

    try:
        json.loads(raw, parse_constant=refuse)
    except (ValueError, RecursionError):  # JSON pydantic reads and Python's module does not: nothing more to say
        pass


async def _releasing(stream: AsyncIterator[str], generation: Generation) -> AsyncIterator[str]:
    """``stream``, its generation aborted however it ends: an error inside a stream skips the response's
    background task, and the request's slot was never released (the server said 429 to all once they ran out)."""
    try:
        async for event in stream:
            yield event
    finally:
        generation.abort()


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _reply(request: Request, response: handlers.Response) -> HTTPResponse:
    if response.stream is not None:
        return StreamingResponse(
            _releasing(response.stream, response.generation), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(response.generation.abort),
        )
    work = asyncio.ensure_future(response.body)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            if not task.done():
                task.cancel()
        response.generation.abort()
    if not work.done() or work.cancelled():
        return HTTPResponse(status_code=499)  # nobody is listening; the request was aborted
    return JSONResponse(work.result())
