"""An OpenAI-compatible HTTP server for one local model (``dpo-serve MODEL_DIR``).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` and
``GET /health``. Supported request fields: ``model`` (required, must be the served name),
``prompt`` (a string or a list of strings) or ``messages`` (rendered with the tokenizer's chat
template, and with ``chat_template_kwargs`` as vLLM takes them), ``max_tokens`` (or its newer name ``max_completion_tokens``, which wins if both are
given), ``temperature`` (0 is greedy), ``top_p``, ``n``, ``seed`` and ``stop`` (a string or up to
four). Other OpenAI fields are accepted and ignored; ``stream=true`` is refused.
Responses carry ``usage`` (prompt, completion and total tokens).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: a body that is
not JSON or fails validation is 400, an unknown model 404, a body over ``max_body_bytes`` 413, and
a prompt or ``max_tokens`` beyond the server's limits (or the model's context) 400.

FastAPI and uvicorn (the ``serve`` extra) are imported only when an app is built, so the rest of
dpo_dist works without them. Requests are served one generation at a time: a single model on one
device (or, with ``device_map``, its layers spread over the visible GPUs and run one after the
other) gains nothing from running two at once.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time,
# and the classes they name are local to create_app.

import errno
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_dist.data.records import RESERVED_TEMPLATE_ARGS
from dpo_dist.generation import Completion, GenerationError, SamplingParams, encode_prompt, render_prompt

log = logging.getLogger("dpo_dist.serve")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 512
    max_body_bytes: int = 1 << 20
    max_choices: int = 8
    """Completions per request: prompts x n."""
    max_stop: int = 4


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        """The OpenAI-style JSON error body."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


UNBOUNDED_CONTEXT = 1 << 30
"""The context of a model whose config declares none (``max_position_embeddings``): no bound of
its own, only ``ServeLimits``'; logged when taken."""


class ServedModel:
    """A causal LM and its tokenizer, generating under a lock."""

    def __init__(self, path: str | Path, name: str, *, device=None, dtype: str = "auto", device_map: str | None = None):
        from dpo_dist.generation import load_causal_lm

        self.name = name
        self.model, self.tokenizer = load_causal_lm(path, device, dtype, device_map)
        declared = getattr(self.model.config, "max_position_embeddings", None)
        self.context = int(declared or UNBOUNDED_CONTEXT)
        if not declared:
            log.warning(
                "%s: the model's config declares no context length (max_position_embeddings): serving it "
                "as unbounded, so only the server's limits (--max-prompt-tokens, --max-tokens) bound a request",
                path,
            )
        self.created = int(time.time())
        self._lock = threading.Lock()

    def encode(self, prompt, template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of a prompt string or a chat messages list, the latter rendered with
        ``template_kwargs`` (GenerationError if it cannot render)."""
        return encode_prompt(render_prompt(prompt, self.tokenizer, template_kwargs), self.tokenizer)

    def generate(self, prompt_ids: Sequence[list[int]], params: SamplingParams, seed: int | None) -> list[Completion]:
        """One batch, one request at a time; ``seed`` makes a sampled answer repeatable."""
        import torch

        from dpo_dist.generation import generate_batch

        with self._lock:
            if seed is not None:
                torch.manual_seed(seed)
            return generate_batch(self.model, self.tokenizer, prompt_ids, params)


def sampling_params(
    request, prompt_lens: Sequence[int], served: ServedModel, limits: ServeLimits, *,
    default_max_tokens: int | None, prompt_param: str,
) -> SamplingParams:
    """Check lengths and stop strings against the limits; the SamplingParams for the request.

    ``default_max_tokens`` None means "as many as the limits and the context allow" (chat).
    """
    longest = max(prompt_lens)
    room = served.context - longest
    if longest > limits.max_prompt_tokens or room < 1:
        limit = min(limits.max_prompt_tokens, served.context - 1)
        raise RequestError(
            400, f"the prompt has {longest} tokens; this server accepts at most {limit}", prompt_param, "prompt_too_long"
        )
    # max_completion_tokens is OpenAI's newer name for max_tokens (current chat clients send it);
    # as in OpenAI's API it wins when both are given. Errors name the field the client sent.
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(request, param) or default_max_tokens or min(limits.max_tokens, room)
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"{param}={max_tokens} is over this server's limit of {limits.max_tokens}", param)
    if max_tokens > room:
        raise RequestError(
            400,
            f"the prompt ({longest} tokens) plus {param} ({max_tokens}) exceeds the model's context of {served.context}",
            param, "context_length_exceeded",
        )
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > limits.max_stop or any(not s for s in stop):
        raise RequestError(400, f"stop: at most {limits.max_stop} non-empty strings", "stop")
    if len(prompt_lens) * request.n > limits.max_choices:
        raise RequestError(400, f"prompts x n is {len(prompt_lens) * request.n}; at most {limits.max_choices}", "n")
    greedy = request.temperature == 0
    return SamplingParams(
        max_new_tokens=max_tokens,
        do_sample=not greedy,
        temperature=request.temperature if not greedy else 1.0,
        top_p=request.top_p,
        stop=tuple(stop),
    )


def usage(completions: Sequence[Completion], prompt_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object (prompt tokens count once per prompt, not once per choice)."""
    completion_tokens = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        error = RequestError(413, f"request body over {self.limit} bytes", None, "request_too_large")
        payload = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class _BodyTooLarge(Exception):
    pass


def create_app(served: ServedModel, limits: ServeLimits | None = None):
    """The FastAPI application serving ``served``."""
    limits = limits or ServeLimits()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.concurrency import run_in_threadpool

    class _Sampling(BaseModel):
        # Unknown OpenAI fields (user, logprobs, ...) are ignored rather than refused.
        model_config = ConfigDict(extra="ignore")
        model: str
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        n: int = Field(1, ge=1)
        # torch.manual_seed's range: beyond it torch raises (a 500, not the client's 400).
        seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
        stop: str | list[str] | None = None
        stream: bool = False

    class CompletionRequest(_Sampling):
        prompt: str | list[str]

    class ChatMessage(BaseModel):
        role: str
        content: str | list[dict[str, Any]]

    class ChatRequest(_Sampling):
        messages: list[ChatMessage] = Field(min_length=1)
        # vLLM's extension (``{"enable_thinking": false}``), as a record's chat_template_kwargs in training.
        chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)

    app = FastAPI(title="dpo-serve", docs_url=None, redoc_url=None)
    app.add_middleware(BodySizeLimit, limit=limits.max_body_bytes)

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def parse(request: Request, schema):
        """The validated request, or a RequestError: bad JSON/fields 400, unknown model 404."""
        body = await request.body()
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(data, dict):
            raise RequestError(400, "the body must be a JSON object", None, "invalid_json")
        try:
            parsed = schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise RequestError(400, f"{where}: {first['msg']}", where) from None
        if parsed.model != served.name:
            raise RequestError(404, f"model {parsed.model!r} not found; this server serves {served.name!r}", "model", "model_not_found")
        if parsed.stream:
            raise RequestError(400, "stream=true is not supported by dpo-serve", "stream")
        return parsed

    def encode_all(prompts, param: str, template_kwargs: dict[str, Any] | None = None) -> list[list[int]]:
        try:
            return [served.encode(p, template_kwargs) for p in prompts]
        except GenerationError as e:
            raise RequestError(400, str(e), param) from None

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "dpo_dist"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or any(not p for p in prompts):
            raise RequestError(400, "prompt: must be a non-empty string or a list of them", "prompt")
        ids = encode_all(prompts, "prompt")
        # 16 is the OpenAI default for legacy completions.
        params = sampling_params(req, [len(i) for i in ids], served, limits, default_max_tokens=16, prompt_param="prompt")
        batch = [row for row in ids for _ in range(req.n)]
        outs = await run_in_threadpool(served.generate, batch, params, req.seed)
        choices = [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(outs)
        ]
        body = _envelope("cmpl", "text_completion", served.name, choices)
        return {**body, "usage": usage(outs, sum(len(i) for i in ids))}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        messages = [{"role": m.role, "content": _content_text(m.content)} for m in req.messages]
        reserved = sorted(RESERVED_TEMPLATE_ARGS & req.chat_template_kwargs.keys())
        if reserved:
            raise RequestError(400, f"chat_template_kwargs: may not set {', '.join(reserved)}", "chat_template_kwargs")
        ids = encode_all([messages], "messages", req.chat_template_kwargs)
        params = sampling_params(req, [len(ids[0])], served, limits, default_max_tokens=None, prompt_param="messages")
        outs = await run_in_threadpool(served.generate, ids * req.n, params, req.seed)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
            for i, c in enumerate(outs)
        ]
        body = _envelope("chatcmpl", "chat.completion", served.name, choices)
        return {**body, "usage": usage(outs, len(ids[0]))}

    return app


def _content_text(content) -> str:
    """A message's text: a string, or the ``text`` parts of an OpenAI content-parts list."""
    if isinstance(content, str):
        return content
    parts = [p.get("text") for p in content if p.get("type") == "text" and isinstance(p.get("text"), str)]
    if len(parts) != len(content):
        raise RequestError(400, "messages: only text content is supported", "messages")
    return "".join(parts)


def _envelope(prefix: str, kind: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model, "choices": choices}


class ServeError(Exception):
    """A server that cannot start as asked (one line fit for the command's error)."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` as uvicorn binds one (IPv6 for a host with a colon), where a
    port in use is a ``ServeError`` (one line for the command) rather than uvicorn's log lines
    and its startup-failure exit."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = (e.strerror or str(e)).lower()
        hint = " (choose another --port)" if e.errno == errno.EADDRINUSE else ""
        raise ServeError(f"cannot listen on {host}:{port}: {reason}{hint}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    model_dir: str, *, host: str, port: int, name: str, limits: ServeLimits, dtype: str = "auto", device_map: str | None = None
) -> None:
    """Load the model and serve it until interrupted."""
    import uvicorn

    # Bound before the model is loaded: a port in use fails in a second, not after minutes of loading.
    with listen_socket(host, port) as sock:
        served = ServedModel(model_dir, name, dtype=dtype, device_map=device_map)
        if device_map:
            placed = sorted({str(p.device) for p in served.model.parameters()})
            log.info("device_map=%s placed the layers on %s", device_map, placed)
        app = create_app(served, limits)
        log.info("serving %s as %r at http://%s:%d/v1", model_dir, name, host, port)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # as uvicorn.run: Ctrl-C is the way to stop it
            pass
