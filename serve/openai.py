"""OpenAI's response shapes, from a reply's pieces of text (serve/text.py): chat completions (a message, or
chunks of deltas) and legacy completions (text with parallel logprob lists), streamed or whole.
"""

import asyncio
import json
from collections.abc import Callable

from pydantic import BaseModel

from serve import schemas as S
from serve.text import Piece, Reply

TokenBytes = Callable[[int], bytes]  # a token id's bytes (DepthText.token_bytes)


def sse(obj) -> str:
    """One server-sent event: a model's JSON (unset fields left out), a dict's, or a string as it is."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump_json(exclude_none=True)
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


DONE = sse("[DONE]")


def token_key(raw: bytes) -> str:
    """A token's name in legacy completions logprobs: its text, or where its bytes are not whole UTF-8 (a
    byte-fallback token, part of a character) "bytes:" and the bytes as \\xNN escapes, as vLLM writes them,
    so that such tokens do not all collide on U+FFFD."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def top_logprob(token_bytes: TokenBytes, token: int, logprob: float) -> S.TopLogprob:
    raw = token_bytes(token)
    return S.TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw))


def chat_logprob(token_bytes: TokenBytes, token: S.Token) -> S.TokenLogprob:
    """A sampled token with its logprob and alternatives, in OpenAI's chat logprobs shape."""
    return S.TokenLogprob(**top_logprob(token_bytes, token.id, token.logprob).model_dump(),
                          top_logprobs=[top_logprob(token_bytes, t, lp) for t, lp in token.top.items()])


def chat_logprobs(token_bytes: TokenBytes, pieces: list[Piece]) -> S.ChoiceLogprobs:
    return S.ChoiceLogprobs(content=[chat_logprob(token_bytes, p.token) for p in pieces if p.token is not None])


def completion_logprobs(token_bytes: TokenBytes, pieces: list[Piece], offset: int = 0) -> S.CompletionLogprobs:
    """Legacy completions logprobs (parallel lists) of a choice's pieces, text offsets from `offset`.
    Tokens and top_logprobs' keys are named by token_key."""
    out = S.CompletionLogprobs()
    for piece in pieces:
        if (token := piece.token) is not None:
            out.tokens.append(token_key(token_bytes(token.id)))
            out.token_logprobs.append(token.logprob)
            out.top_logprobs.append(None if token.logprob is None else
                                    {token_key(token_bytes(t)): lp for t, lp in token.top.items()})
            out.text_offset.append(offset)
        offset += len(piece.text)
    return out


class ChatShapes:
    """One chat completion's responses: whole, or as chunks."""

    def __init__(self, reply: Reply, model: str, logprobs: bool):
        self.reply, self.model, self.logprobs = reply, model, logprobs
        self.id, self.created = S.new_id("chatcmpl"), S.now()

    def _logprobs(self, pieces: list[Piece]) -> S.ChoiceLogprobs | None:
        return chat_logprobs(self.reply.text.token_bytes, pieces) if self.logprobs else None

    async def whole(self) -> S.ChatCompletion:
        got = [p async for p in self.reply]
        choice = S.ChatChoice(message=S.ChatMessageOut(content="".join(p.text for p in got)),
                              logprobs=self._logprobs(got), finish_reason=self.reply.finish_reason)
        return S.ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice],
                                usage=S.usage(self.reply.prompt_tokens, self.reply.completion_tokens))

    def _chunk(self, delta: S.ChatDelta, **kw) -> str:
        return sse(S.ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                         choices=[S.ChatChunkChoice(delta=delta, **kw)]))

    async def chunks(self, include_usage: bool):
        reply = self.reply
        yield self._chunk(S.ChatDelta(role="assistant", content=""))
        async for p in reply:
            if p.text or (self.logprobs and p.token is not None):
                yield self._chunk(S.ChatDelta(content=p.text), logprobs=self._logprobs([p]))
        yield self._chunk(S.ChatDelta(), finish_reason=reply.finish_reason)
        if include_usage:
            yield sse(S.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                            usage=S.usage(reply.prompt_tokens, reply.completion_tokens)))
        yield DONE


class CompletionShapes:
    """One legacy completion's responses (a choice per prompt): whole, or as chunks."""

    def __init__(self, replies: list[Reply], model: str, logprobs: bool):
        self.replies, self.model, self.logprobs = replies, model, logprobs
        self.id, self.created = S.new_id("cmpl"), S.now()

    def _usage(self) -> S.Usage:
        return S.usage(sum(r.prompt_tokens for r in self.replies), sum(r.completion_tokens for r in self.replies))

    def _logprobs(self, reply: Reply, pieces: list[Piece], offset: int = 0) -> S.CompletionLogprobs | None:
        return completion_logprobs(reply.text.token_bytes, pieces, offset) if self.logprobs else None

    async def _choice(self, index: int, reply: Reply) -> S.CompletionChoice:
        got = [p async for p in reply]
        return S.CompletionChoice(index=index, text="".join(p.text for p in got), logprobs=self._logprobs(reply, got),
                                  finish_reason=reply.finish_reason)

    async def whole(self) -> S.Completion:
        choices = await asyncio.gather(*(self._choice(i, r) for i, r in enumerate(self.replies)))
        return S.Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=self._usage())

    def _chunk(self, choices: list[S.CompletionChoice], usage: S.Usage | None = None) -> str:
        return sse(S.Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage))

    async def chunks(self, include_usage: bool):
        """Prompts one after another; each chunk names its prompt's index."""
        try:
            for index, reply in enumerate(self.replies):
                offset = 0
                async for p in reply:
                    yield self._chunk([S.CompletionChoice(index=index, text=p.text,
                                                          logprobs=self._logprobs(reply, [p], offset))])
                    offset += len(p.text)
                yield self._chunk([S.CompletionChoice(index=index, text="", finish_reason=reply.finish_reason)])
            if include_usage:
                yield self._chunk([], self._usage())
            yield DONE
        finally:
            for reply in self.replies:
                reply.cancel()
