"""The HTTP edge: the FastAPI app and `Gateway`, the Serve ingress that holds every depth's tokenizer and
DeploymentHandle. A request is validated here, once (the schemas, then the depth's context and vocabulary in
serve/text.py), sent to its depth's replica as a GenerateRequest, and its token events are shaped into the
native or OpenAI responses (serve/openai.py).

Routes: native POST /d{depth}/chat, GET /d{depth}/stats, POST /d{depth}/core; OpenAI GET /v1/models (and
/v1/models/{id}), POST /v1/chat/completions, POST /v1/completions; vLLM's POST /tokenize, POST /detokenize and
GET /tokenizer_info (what lm-eval's tokenizer_backend=remote calls); GET / (the web chat page), GET /health,
GET /docs.
"""

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from ray import serve
from ray._private import state
from ray.serve.handle import DeploymentHandle

from nanoray.checkpoint import load_tokenizer
from nanoray.core_data.bundle import BundleUnavailable
from nanoray.core_eval import evaluate_core
from nanoray.tokenizer import BOS
from serve import errors
from serve import schemas as S
from serve.errors import ApiError
from serve.family import Family, Member
from serve.openai import ChatShapes, CompletionShapes, sse
from serve.text import SPECIAL_STOPS, DepthText, Prompt, Reply

PAGE = Path(__file__).parent / "static" / "index.html"

# FastAPIOffline: the /docs and /redoc pages load their scripts from this server, not a CDN (blank offline)
app = FastAPIOffline(title="nanoray", description="A family of small GPTs, one depth per model.")
errors.install(app, S.MAX_BODY_BYTES)


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events; a failure after the response has started becomes a last `data: {"error": ...}`."""
    async def guarded():
        try:
            async for event in events:
                yield event
        except Exception as e:
            yield sse(errors.server_error(e))
    return StreamingResponse(guarded(), media_type="text/event-stream")


def free_gpu_share(most: float = 0.5) -> float:
    """The GPU share a CORE actor (1 CPU and the share) can have at once on one node: the largest free GPU
    amount of any single node that also has a CPU free, at most `most`; 0 (run on the CPU) where none has.
    Cluster-wide sums (ray.available_resources) could name a share that no one node holds, and the actor
    would then wait."""
    try:
        nodes = state.available_resources_per_node().values()
    except Exception:  # a private API: without it, the CPU
        return 0.0
    return min(max((n.get("GPU", 0.0) for n in nodes if n.get("CPU", 0.0) >= 1), default=0.0), most)


def model_card(m: Member) -> S.ModelCard:
    return S.ModelCard(id=S.model_id(m.depth), created=0, depth=m.depth, params=m.params, seq_len=m.seq_len,
                       vocab_size=m.vocab_size)


@dataclass(frozen=True)
class Depth:
    """A served depth as the ingress sees it: its facts, its tokenizer, and its replicas' handle."""
    member: Member
    text: DepthText
    handle: DeploymentHandle

    async def open(self, prompt: Prompt, job: S.GenerateRequest, stops: Sequence[str] = (),
                   echo: bool = False) -> Reply:
        stream = self.handle.options(stream=True).generate.remote(job)
        return await Reply.open(self.text, prompt, stream, stops, echo)


@serve.deployment(max_ongoing_requests=1024, graceful_shutdown_timeout_s=20, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Gateway:
    """The routes (module docstring) over one DeploymentHandle per depth."""

    def __init__(self, models: dict[int, DeploymentHandle], family: Family, max_body_bytes: int = S.MAX_BODY_BYTES):
        app.state.max_body_bytes = max_body_bytes  # the app is this replica's; no request has come yet
        self.depths = {m.depth: Depth(m, DepthText(m, load_tokenizer(m.checkpoint)), models[m.depth])
                       for m in family.members}
        self.unservable = family.unservable
        # vLLM's tokenizer routes may name no model (lm-eval's remote tokenizer never does): then the tokenizer every
        # depth shares, with the shortest context; None where the depths' tokenizers differ (`model` is required).
        texts = [d.text for d in self.depths.values()]
        self.shared = (min(texts, key=lambda t: t.member.seq_len)
                       if texts and all(t.tokenizer.same_as(texts[0].tokenizer) for t in texts) else None)
        self.page = PAGE.read_text()
        self.core_lock = asyncio.Semaphore(1)  # serializes /d{depth}/core runs

    def _unservable(self, depth: int, param: str) -> None:
        """A 503 for a depth whose checkpoint could not be served, with why."""
        for u in self.unservable:
            if u.depth == depth:
                raise ApiError(503, f"{param}: the checkpoint of depth {depth} cannot be served ({u.checkpoint}: "
                                    f"{u.reason})", param, "model_unavailable", type="server_error")

    def _depth(self, depth: int) -> Depth:
        if depth not in self.depths:
            self._unservable(depth, "depth")
            raise ApiError(404, f"depth: no model of depth {depth}; served depths: {sorted(self.depths)}",
                           "depth", "model_not_found")
        return self.depths[depth]

    def _model(self, model: str) -> Depth:
        depth = model.removeprefix(S.MODEL_PREFIX)
        ours = model.startswith(S.MODEL_PREFIX) and depth.isdigit()
        if not (ours and int(depth) in self.depths):
            if ours:
                self._unservable(int(depth), "model")
            raise ApiError(404, f"model: {model!r} does not exist; served models: "
                                f"{[S.model_id(d) for d in self.depths]}", "model", "model_not_found")
        return self.depths[int(depth)]

    def _text(self, model: str | None) -> DepthText:
        """The tokenizer side of `model`, or with none named, the one every served depth shares."""
        if model is not None:
            return self._model(model).text
        if self.shared is None:
            raise ApiError(400, f"model: required here, as the served models' tokenizers differ; one of "
                                f"{[S.model_id(d) for d in self.depths]}", "model", "missing_required_parameter")
        return self.shared

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.get("/health")
    async def health(self) -> dict:
        """Every depth's engine stats (one replica each), and the checkpoints that could not be served (status
        "degraded"); 503 if any served depth does not answer."""
        depths = sorted(self.depths)
        try:
            stats = await asyncio.wait_for(asyncio.gather(*(self.depths[d].handle.stats.remote() for d in depths)),
                                           30)
        except Exception as e:
            raise ApiError(503, f"a depth did not answer: {e}", type="server_error", code="unhealthy") from None
        return dict(status="degraded" if self.unservable else "ok",
                    models={S.model_id(d): s for d, s in zip(depths, stats)},
                    unservable=[u.model_dump() for u in self.unservable])

    @app.get("/d{depth}/stats")
    async def stats(self, depth: int) -> dict:
        """The engine stats of one of this depth's replicas."""
        return await self._depth(depth).handle.stats.remote()

    @app.post("/d{depth}/chat", response_model=S.ChatReply, responses={400: {"model": S.ErrorResponse}})
    async def chat(self, depth: int, req: S.ChatRequest):
        """Chat turns in; server-sent events `data: {"token": text, "id": token id}` and a final
        `data: {"done": true, "text", "finish_reason", "usage", "model"}` out, or one JSON reply."""
        d = self._depth(depth)
        prompt = d.text.chat(req.messages)
        reply = await d.open(prompt, d.text.request(prompt, req))

        def done(text: str) -> S.ChatReply:
            return S.ChatReply(model=S.model_id(depth), text=text, finish_reason=reply.finish_reason,
                               usage=S.usage(reply.prompt_tokens, reply.completion_tokens))

        if not req.stream:
            return done("".join([p.text async for p in reply]))

        async def stream():
            text = []
            async for p in reply:
                text.append(p.text)
                yield sse({"token": p.text} if p.token is None else {"token": p.text, "id": p.token.id})
            yield sse(dict(done=True, **done("".join(text)).model_dump()))

        return event_stream(stream())

    @app.post("/d{depth}/core")
    async def core(self, depth: int, req: S.CoreRequest) -> dict:
        """CORE (or core-lite) of this depth's checkpoint, evaluated by Ray actors; the scores."""
        member = self._depth(depth).member
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

    # vLLM's tokenizer routes (plain functions: FastAPI runs them in its thread pool, so a long text's tokenizing
    # does not hold up the streams the event loop serves).

    @app.post("/tokenize", response_model=S.Tokens, responses={400: {"model": S.ErrorResponse}})
    def tokenize(self, req: S.TokenizeRequest) -> S.Tokens:
        """A text (or chat turns) to the token ids this server gives the model: with add_special_tokens (the
        default) what /v1/completions makes of the text; no length limit but the body's."""
        if (req.prompt is None) == (req.messages is None):
            raise errors.invalid("prompt", "give exactly one of prompt (a text) and messages (chat turns)",
                                 "missing_required_parameter" if req.prompt is None else "invalid_value")
        text = self._text(req.model)
        tokens = text.render(req.messages) if req.messages is not None else text.tokenize(req.prompt,
                                                                                         req.add_special_tokens)
        return S.Tokens(tokens=tokens, count=len(tokens), max_model_len=text.member.seq_len)

    @app.post("/detokenize", response_model=S.Text, responses={400: {"model": S.ErrorResponse}})
    def detokenize(self, req: S.DetokenizeRequest) -> S.Text:
        """Token ids to text (special tokens as their strings; bytes that end mid-character as U+FFFD)."""
        return S.Text(prompt=self._text(req.model).detokenize(req.tokens))

    @app.get("/tokenizer_info", response_model=S.TokenizerInfo)
    def tokenizer_info(self, model: str | None = None) -> S.TokenizerInfo:
        """The special tokens (lm-eval's remote tokenizer reads bos_token and eos_token) and the context."""
        text = self._text(model)
        return S.TokenizerInfo(bos_token=BOS, eos_token=SPECIAL_STOPS["text"][0], vocab_size=text.tokenizer.vocab_size,
                               model_max_length=text.member.seq_len, special_tokens=text.tokenizer.special_tokens)

    @app.get("/v1/models", response_model=S.ModelList)
    def models(self) -> S.ModelList:
        return S.ModelList(data=[model_card(d.member) for d in self.depths.values()])

    @app.get("/v1/models/{model}", response_model=S.ModelCard, responses={404: {"model": S.ErrorResponse}})
    def model(self, model: str) -> S.ModelCard:
        return model_card(self._model(model).member)

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, responses={400: {"model": S.ErrorResponse}})
    async def chat_completions(self, req: S.ChatCompletionRequest):
        d = self._model(req.model)
        prompt = d.text.chat(req.messages)
        job = d.text.request(prompt, req, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        shapes = ChatShapes(await d.open(prompt, job, req.stop), req.model, req.logprobs)
        if not req.stream:
            return await shapes.whole()
        return event_stream(shapes.chunks(req.stream_options is not None and req.stream_options.include_usage))

    @app.post("/v1/completions", response_model=S.Completion, responses={400: {"model": S.ErrorResponse}})
    async def completions(self, req: S.CompletionRequest):
        d = self._model(req.model)
        prompts = [d.text.text(p) for p in req.prompt]
        jobs = [d.text.request(p, req, logprobs=req.logprobs, echo=req.echo) for p in prompts]
        opened = await asyncio.gather(*(d.open(p, job, req.stop, req.echo) for p, job in zip(prompts, jobs)),
                                      return_exceptions=True)
        if failed := [r for r in opened if isinstance(r, BaseException)]:
            for reply in opened:
                if isinstance(reply, Reply):
                    reply.cancel()
            raise failed[0]
        shapes = CompletionShapes(opened, req.model, req.logprobs is not None)
        if not req.stream:
            return await shapes.whole()
        return event_stream(shapes.chunks(req.stream_options is not None and req.stream_options.include_usage))
