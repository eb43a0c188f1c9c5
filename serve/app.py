"""The Ray Serve application: one deployment per depth (an inference engine each) behind one FastAPI ingress.

    python -m serve --run-dir runs/miniseries                  # the shortcut: local Ray, prints the URLs
    serve run serve/config.yaml                                # the same through Serve's config file
    serve deploy serve/config.yaml --address http://HEAD:8265  # onto a running cluster

Why one application: the depths are discovered from the run directory when the app is built, so one
builder and one static config serve any run, behind one route table (`/d{depth}/...` and `/v1/...`).
Each depth is still its own deployment (`d1`, `d2`, ...) with its own replicas, GPU share, autoscaling
and health check; the ingress calls them through DeploymentHandles (no second HTTP hop). The price: a
depth is not deployed or rolled back on its own (a deploy replaces the app; Serve restarts only the
deployments whose code or options changed).

Routes: see `Gateway` below, the README, or GET /docs on a running server.
"""

import asyncio
import json
import re
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.exceptions import HTTPException

from serve import schemas as S
from serve.depth import DepthModel
from serve.family import Member, find_family

PAGE = Path(__file__).parent / "static" / "index.html"


class ServeArgs(BaseModel):
    """What `build` takes (serve/config.yaml's `args`, `python -m serve`'s flags)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    run_dir: str | None = Field(None, description="a run directory with results.csv (runs/<name>)")
    checkpoints: list[str] = Field([], description="checkpoint directories, instead of run_dir")
    num_gpus: float | None = Field(None, ge=0, le=1, description="GPU share of each depth's replica; "
                                   "default 1/depths when the cluster has GPUs, else 0")
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved for each depth's replica (its engine runs "
                            "one thread; small, so that a laptop's few CPUs hold every depth and the CORE actors)")
    max_batch: int = Field(32, ge=1, description="sequences one replica's engine decodes together")
    max_replicas: int = Field(1, ge=1, description="autoscaling ceiling per depth")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.run_dir is None) == (not self.checkpoints):
            raise ValueError("run_dir, checkpoints: give exactly one of them")
        return self


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        self.status, self.body = status, S.ErrorBody(message=message, type=type, param=param, code=code)


def error_response(status: int, body: S.ErrorBody) -> JSONResponse:
    return JSONResponse(S.ErrorResponse(error=body).model_dump(), status_code=status)


def _param(loc: tuple) -> str | None:
    """A validation error's location as a field path: ("body", "messages", 2, "role") -> messages[2].role."""
    path = ""
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[a-z_]+", part) and part not in ("str", "int", "list", "float", "bool"):
            path += f".{part}" if path else part
    return path or None


app = FastAPI(title="nanoray", description="A family of small GPTs, one depth per model.")


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return error_response(400, S.ErrorBody(message=f"body is not valid JSON: {err['msg']}", code="invalid_json"))
    param = _param(tuple(err["loc"]))
    code = ("missing_required_parameter" if err["type"] == "missing" else
            "invalid_type" if err["type"].endswith("_type") else "invalid_value")
    message = err["msg"].removeprefix("Value error, ")
    return error_response(400, S.ErrorBody(message=f"{param or 'body'}: {message}", param=param, code=code))


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.body)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, S.ErrorBody(message=f"{request.method} {request.url.path}: {exc.detail}",
                                                       code="not_found" if exc.status_code == 404 else None))


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, S.ErrorBody(message=f"{type(exc).__name__}: {exc}", type="server_error"))


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events; a failure after the response has started becomes a last `data: {"error": ...}`."""
    async def guarded():
        try:
            async for event in events:
                yield event
        except Exception as e:
            yield sse(S.ErrorResponse(error=S.ErrorBody(message=f"{type(e).__name__}: {e}", type="server_error"))
                      .model_dump())
    return StreamingResponse(guarded(), media_type="text/event-stream")


def _job(req: S.Sampling, messages=None, prompt=None, stop=(), logprobs=None, echo=False) -> dict:
    return dict(messages=messages and [m.model_dump() for m in messages], prompt=prompt, max_tokens=req.max_tokens,
                temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop=list(stop),
                logprobs=logprobs, echo=echo)


class Events:
    """One request's event stream from a depth's replica, opened: the header is already read (so a bad
    request fails before any response starts). Iterating yields the token and text events, then sets
    finish_reason and completion_tokens; closing early cancels the request there, freeing its engine slot."""

    def __init__(self, header: dict, stream):
        self.header, self.stream = header, stream
        self.finish_reason, self.completion_tokens = None, 0
        self.prompt_tokens = header["prompt_tokens"]

    async def __aiter__(self):
        try:
            async for event in self.stream:
                if "finish_reason" in event:
                    self.finish_reason, self.completion_tokens = event["finish_reason"], event["completion_tokens"]
                else:
                    yield event
        finally:
            if self.finish_reason is None:
                self.stream.cancel()


def token_key(entry: dict) -> str:
    """A token's name in legacy completions logprobs: its text, or where its bytes are not whole UTF-8 (a
    byte-fallback token, part of a character) "bytes:" and the bytes as \\xNN escapes, as vLLM writes them,
    so that such tokens do not all collide on U+FFFD."""
    raw = bytes(entry["bytes"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _completion_logprobs(pieces: list[dict], offset: int = 0) -> S.CompletionLogprobs:
    """Legacy completions logprobs (parallel lists) of a choice's text pieces, text offsets from `offset`.
    Tokens and top_logprobs' keys are named by token_key."""
    out = S.CompletionLogprobs()
    for piece in pieces:
        if lp := piece.get("logprobs"):
            out.tokens.append(token_key(lp))
            out.token_logprobs.append(lp["logprob"])
            out.top_logprobs.append(None if lp["logprob"] is None else
                                    {token_key(t): t["logprob"] for t in lp["top_logprobs"]})
            out.text_offset.append(offset)
        offset += len(piece["text"])
    return out


def free_gpu_share(most: float = 0.5) -> float:
    """The GPU share a CORE actor (1 CPU and the share) can have at once on one node: the largest free GPU
    amount of any single node that also has a CPU free, at most `most`; 0 (run on the CPU) where none has.
    Cluster-wide sums (ray.available_resources) could name a share that no one node holds, and the actor
    would then wait."""
    from ray._private.state import available_resources_per_node

    try:
        nodes = available_resources_per_node().values()
    except Exception:  # a private API: without it, the CPU
        return 0.0
    return min(max((n.get("GPU", 0.0) for n in nodes if n.get("CPU", 0.0) >= 1), default=0.0), most)


@serve.deployment(max_ongoing_requests=1024, graceful_shutdown_timeout_s=20, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Gateway:
    """Routes. Native: POST /d{depth}/chat, GET /d{depth}/stats, POST /d{depth}/core. OpenAI: GET /v1/models,
    POST /v1/chat/completions, POST /v1/completions. And GET / (the web chat page), GET /health."""

    def __init__(self, models: dict, family: list[Member]):
        self.models = models  # depth -> DeploymentHandle
        self.family = {m.depth: m for m in family}
        self.page = PAGE.read_text()
        self.core_lock = asyncio.Semaphore(1)  # serializes /d{depth}/core runs

    def _member(self, depth: int) -> Member:
        if depth not in self.family:
            raise ApiError(404, f"depth: no model of depth {depth}; served depths: {sorted(self.family)}",
                           "depth", "model_not_found")
        return self.family[depth]

    def _model(self, model: str) -> Member:
        depth = model.removeprefix(S.MODEL_PREFIX)
        if not (model.startswith(S.MODEL_PREFIX) and depth.isdigit() and int(depth) in self.family):
            raise ApiError(404, f"model: {model!r} does not exist; served models: "
                                f"{[S.model_id(d) for d in self.family]}", "model", "model_not_found")
        return self.family[int(depth)]

    async def _open(self, member: Member, job: dict) -> Events:
        stream = self.models[member.depth].options(stream=True).generate.remote(job)
        header = await stream.__anext__()
        if "error" in header:
            raise ApiError(400, **header["error"])
        return Events(header, stream)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.get("/health")
    async def health(self) -> dict:
        """Every depth's engine stats (one replica each); 503 if any depth does not answer."""
        depths = sorted(self.family)
        try:
            stats = await asyncio.wait_for(asyncio.gather(*(self.models[d].stats.remote() for d in depths)), 30)
        except Exception as e:
            raise ApiError(503, f"a depth did not answer: {e}", type="server_error", code="unhealthy") from None
        return dict(status="ok", models={S.model_id(d): s for d, s in zip(depths, stats)})

    @app.get("/d{depth}/stats")
    async def stats(self, depth: int) -> dict:
        """The engine stats of one of this depth's replicas."""
        return await self.models[self._member(depth).depth].stats.remote()

    @app.post("/d{depth}/chat", response_model=S.ChatReply, responses={400: {"model": S.ErrorResponse}})
    async def chat(self, depth: int, req: S.ChatRequest):
        """Chat turns in; server-sent events `data: {"token": text, "id": token id}` and a final
        `data: {"done": true, "text", "finish_reason", "usage", "model"}` out, or one JSON reply."""
        member = self._member(depth)
        events = await self._open(member, _job(req, messages=req.messages))

        def reply(text: str) -> S.ChatReply:
            return S.ChatReply(model=S.model_id(depth), text=text, finish_reason=events.finish_reason,
                               usage=S.usage(events.prompt_tokens, events.completion_tokens))

        if not req.stream:
            return reply("".join([e["text"] async for e in events]))

        async def stream():
            text = []
            async for e in events:
                text.append(e["text"])
                yield sse({"token": e["text"], "id": e["id"]} if "id" in e else {"token": e["text"]})
            yield sse(dict(done=True, **reply("".join(text)).model_dump()))

        return event_stream(stream())

    @app.post("/d{depth}/core")
    async def core(self, depth: int, req: S.CoreRequest) -> dict:
        """CORE (or core-lite) of this depth's checkpoint, evaluated by Ray actors; the scores."""
        import ray

        from nanoray.core_data.bundle import BundleUnavailable
        from nanoray.core_eval import evaluate_core

        member = self._member(depth)
        try:
            async with self.core_lock:  # one run at a time per gateway: two would both count the same free share
                share = free_gpu_share()
                result = await asyncio.to_thread(evaluate_core, member.checkpoint, tasks=req.tasks, num_workers=1,
                                                 max_per_task=req.max_per_task, use_gpu=share >= 0.05,
                                                 gpu_share=share)
        except ValueError as e:
            param = str(e).split(":")[0]
            raise ApiError(400, str(e), param if param in S.CoreRequest.model_fields else None,
                           "invalid_value") from None
        except BundleUnavailable as e:
            raise ApiError(503, str(e), "tasks", "bundle_unavailable", type="server_error") from None
        return dict(model=S.model_id(depth), **result)

    @app.get("/v1/models", response_model=S.ModelList)
    def models(self) -> S.ModelList:
        return S.ModelList(data=[S.ModelCard(id=S.model_id(m.depth), created=0, depth=m.depth, params=m.params,
                                             seq_len=m.seq_len, vocab_size=m.vocab_size)
                                 for m in self.family.values()])

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, responses={400: {"model": S.ErrorResponse}})
    async def chat_completions(self, req: S.ChatCompletionRequest):
        member = self._model(req.model)
        top = (req.top_logprobs or 0) if req.logprobs else None
        events = await self._open(member, _job(req, messages=req.messages, stop=req.stop, logprobs=top))
        cid, created = S.new_id("chatcmpl"), S.now()

        def logprobs(batch: list[dict]) -> S.ChoiceLogprobs | None:
            return S.ChoiceLogprobs(content=[e["logprobs"] for e in batch if e.get("logprobs")]) if req.logprobs \
                else None

        if not req.stream:
            got = [e async for e in events]
            message = S.ChatMessageOut(content="".join(e["text"] for e in got))
            return S.ChatCompletion(id=cid, created=created, model=req.model, choices=[
                S.ChatChoice(message=message, logprobs=logprobs(got), finish_reason=events.finish_reason)],
                usage=S.usage(events.prompt_tokens, events.completion_tokens))

        def chunk(delta: S.ChatDelta, **kw) -> str:
            choice = S.ChatChunkChoice(delta=delta, **kw)
            return sse(S.ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[choice])
                       .model_dump_json(exclude_none=True))

        async def stream():
            yield chunk(S.ChatDelta(role="assistant", content=""))
            async for e in events:
                if e["text"] or e.get("logprobs"):
                    yield chunk(S.ChatDelta(content=e["text"]), logprobs=logprobs([e]))
            yield chunk(S.ChatDelta(), finish_reason=events.finish_reason)
            if req.stream_options and req.stream_options.include_usage:
                yield sse(S.ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[], usage=S.usage(
                    events.prompt_tokens, events.completion_tokens)).model_dump_json(exclude_none=True))
            yield sse("[DONE]")

        return event_stream(stream())

    @app.post("/v1/completions", response_model=S.Completion, responses={400: {"model": S.ErrorResponse}})
    async def completions(self, req: S.CompletionRequest):
        member = self._model(req.model)
        jobs = [_job(req, prompt=p, stop=req.stop, logprobs=req.logprobs, echo=req.echo) for p in req.prompt]
        opened = await asyncio.gather(*(self._open(member, job) for job in jobs), return_exceptions=True)
        if failed := [e for e in opened if isinstance(e, BaseException)]:
            for events in opened:
                if isinstance(events, Events):
                    events.stream.cancel()
            raise failed[0]
        cid, created = S.new_id("cmpl"), S.now()
        want_logprobs = req.logprobs is not None

        def usage() -> S.Usage:
            return S.usage(sum(e.prompt_tokens for e in opened), sum(e.completion_tokens for e in opened))

        async def pieces(events: Events):
            """A choice's text in pieces {"text", "logprobs"}: the echoed prompt's tokens, then the sampled ones."""
            for piece in events.header["echo"] or []:
                yield piece
            async for piece in events:
                yield piece

        if not req.stream:
            async def choice(index: int, events: Events) -> S.CompletionChoice:
                got = [p async for p in pieces(events)]
                return S.CompletionChoice(index=index, text="".join(p["text"] for p in got),
                                          logprobs=_completion_logprobs(got) if want_logprobs else None,
                                          finish_reason=events.finish_reason)

            choices = await asyncio.gather(*(choice(i, events) for i, events in enumerate(opened)))
            return S.Completion(id=cid, created=created, model=req.model, choices=choices, usage=usage())

        def chunk(index: int, text: str, logprobs=None, finish_reason=None, totals=None) -> str:
            choices = [] if totals else [S.CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                            finish_reason=finish_reason)]
            return sse(S.Completion(id=cid, created=created, model=req.model, choices=choices, usage=totals)
                       .model_dump_json(exclude_none=True))

        async def stream():  # prompts one after another; each chunk names its prompt's index
            try:
                for index, events in enumerate(opened):
                    offset = 0
                    async for p in pieces(events):
                        yield chunk(index, p["text"], _completion_logprobs([p], offset) if want_logprobs else None)
                        offset += len(p["text"])
                    yield chunk(index, "", finish_reason=events.finish_reason)
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk(0, "", totals=usage())
                yield sse("[DONE]")
            finally:
                for events in opened:
                    if events.finish_reason is None:
                        events.stream.cancel()

        return event_stream(stream())


# ---------------------------------------------------------------------------------------------------


def deployments(args: ServeArgs, family: list[Member]):
    """The bound application: a DepthModel deployment per member, and the Gateway over them."""
    import ray

    num_gpus = args.num_gpus
    if num_gpus is None:
        has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        num_gpus = round(1 / len(family), 4) if has_gpus else 0
    scaling = dict(min_replicas=1, max_replicas=args.max_replicas, target_ongoing_requests=args.max_batch)
    models = {m.depth: DepthModel.options(
        name=f"d{m.depth}", ray_actor_options=dict(num_cpus=args.num_cpus, num_gpus=num_gpus),
        autoscaling_config=scaling, max_ongoing_requests=4 * args.max_batch).bind(m, args.max_batch)
        for m in family}
    return Gateway.bind(models, family)


def build(args: dict) -> serve.Application:
    """The application builder that serve/config.yaml names: `args` are ServeArgs' fields."""
    args = ServeArgs.model_validate(args)
    return deployments(args, find_family(args.run_dir, args.checkpoints or None))


def run(args: ServeArgs, family: list[Member], host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """Serve `family` on the running Ray cluster at host:port; returns the lines that say where. Raises when
    the family does not answer there (Serve already running on this cluster keeps its own address)."""
    import time
    import urllib.request

    serve.start(http_options={"host": host, "port": port})
    serve.run(deployments(args, family), name="nanoray", route_prefix="/")
    base = f"http://{host}:{port}"
    probe = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/health"
    for attempt in range(20):
        try:
            with urllib.request.urlopen(probe, timeout=5):
                break
        except OSError as e:
            if attempt == 19:
                raise RuntimeError(f"port: the family does not answer at {probe} ({e}); Ray Serve already runs on "
                                   f"this cluster at another address? `serve shutdown -y`, or use its port") from e
            time.sleep(0.5)
    return ([f"chat page      {base}/"]
            + [f"depth {m.depth:<8} {base}/d{m.depth}/chat   (model nanoray-d{m.depth}, {m.params / 1e6:.1f}M params)"
               for m in family]
            + [f"OpenAI API     {base}/v1   (GET {base}/v1/models)"])


def serve_until_stopped() -> None:
    """Block until Ctrl-C or SIGTERM (`ray job stop` sends it), then take the family down: Serve's actors
    are detached and would otherwise outlive this process, holding their GPU shares."""
    import signal
    import time

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete("nanoray", _blocking=False)  # first, at once: `ray job stop` kills us 3 s after SIGTERM
        serve.shutdown()


def serve_family(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the family `args` names on the running Ray cluster until Ctrl-C or `ray job stop`, then take it down."""
    print("\n".join(run(args, find_family(args.run_dir, args.checkpoints or None), host, port)), flush=True)
    print("serving until stopped (Ctrl-C, or `ray job stop`)", flush=True)
    serve_until_stopped()
