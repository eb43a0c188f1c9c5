"""The ingress's text side of a request, where each depth's tokenizer lives: chat turns or a prompt in, checked
token ids out (an `ApiError` naming the field where they do not fit the depth); a replica's token events in,
text out, detokenized incrementally and cut at stop strings.

The replica (serve/depth.py) then sees only token ids: a request that reaches it is valid.
"""

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from nanoray.engine import SamplingParams
from nanoray.tokenizer import TextStream, Tokenizer, render_chat
from serve.errors import invalid
from serve.family import Member
from serve.schemas import Echo, Event, Finish, GenerateRequest, Message, Sampling, Token

SPECIAL_STOPS = {"chat": ("<|assistant_end|>", "<|bos|>"), "text": ("<|bos|>",)}  # tokens that end a reply


class StopScanner:
    """Cuts streamed text at the first stop string, holding back any tail that could start one.

    Linear in the text: each stop string has a Knuth-Morris-Pratt automaton whose state (how much of the stop
    the text ends with) advances once per new character, so a token costs its own characters times the number
    of stops, whatever their length; the held-back tail is the longest of those matched prefixes."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""
        self.fallback = [_prefix_function(s) for s in stops]
        self.matched = [0] * len(stops)  # of each stop, the characters the text so far ends with

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        pending, start = self.pending + text, len(self.pending)  # pending: shorter than the longest stop
        first = None  # where the earliest stop string found starts in `pending`
        for i, (stop, fallback) in enumerate(zip(self.stops, self.fallback)):
            q = self.matched[i]
            for j, c in enumerate(text):
                while q and stop[q] != c:
                    q = fallback[q - 1]
                q += stop[q] == c
                if q == len(stop):
                    at = start + j + 1 - q
                    first = at if first is None else min(first, at)
                    break
            self.matched[i] = q
        if first is not None:
            self.pending, self.matched = "", [0] * len(self.stops)
            return pending[:first], True
        cut = len(pending) - max(self.matched, default=0)
        self.pending = pending[cut:]
        return pending[:cut], False

    def flush(self) -> str:
        out, self.pending, self.matched = self.pending, "", [0] * len(self.stops)
        return out


def _prefix_function(s: str) -> list[int]:
    """KMP's failure function: entry q is the length of the longest proper prefix of s[:q + 1] that is also
    its suffix."""
    out, k = [0] * len(s), 0
    for q in range(1, len(s)):
        while k and s[q] != s[k]:
            k = out[k - 1]
        k += s[q] == s[k]
        out[q] = k
    return out


@dataclass(frozen=True)
class Prompt:
    """A request's prompt as token ids, checked against the depth's vocabulary."""
    tokens: list[int]
    kind: Literal["chat", "text"]  # chat turns (rendered) or a prompt (text or token ids)
    start: int = 0  # where the client's own tokens start: 1 after a BOS the server added

    @property
    def field(self) -> str:
        """The request field the prompt came from, for errors."""
        return "messages" if self.kind == "chat" else "prompt"


@dataclass(frozen=True)
class Piece:
    """A piece of a reply's text; `token` is the token it came with (None: text held back until the end)."""
    text: str
    token: Token | None = None


class DepthText:
    """One depth's tokenizer at the edge: prompts in, checked; replies' tokens out, as text."""

    def __init__(self, member: Member, tokenizer: Tokenizer):
        self.member, self.tokenizer = member, tokenizer
        self.stop_ids = {kind: [tokenizer.encode_special(t) for t in names] for kind, names in SPECIAL_STOPS.items()}
        # A token spans at most this many bytes, so at most as many characters: a text longer than the context
        # times that cannot fit, and is refused before the tokenizer reads it.
        self.token_chars = int(tokenizer.token_bytes().max())

    def _fits(self, field: str, chars: int) -> None:
        most = self.member.seq_len * self.token_chars
        if chars > most:
            raise invalid(field, f"{chars} characters cannot fit this model's context of {self.member.seq_len} "
                                 f"tokens (at most {most}: no token spans more than {self.token_chars})",
                          "context_length_exceeded")

    def chat(self, messages: list[Message]) -> Prompt:
        self._fits("messages", sum(len(m.content) for m in messages))
        return Prompt(self.render(messages), "chat")

    def render(self, messages: list[Message]) -> list[int]:
        """Chat turns as token ids (a message's text never becomes a special token: no forged turns)."""
        turns = [dict(role="system" if m.role == "developer" else m.role, content=m.content) for m in messages]
        try:
            return render_chat(self.tokenizer, turns)
        except ValueError as e:  # it names the message: "messages[2].role: ..."
            param = str(e).split(":")[0]
            raise invalid(param if param.startswith("messages") else "messages", str(e)) from None

    def text(self, prompt: str | list[int]) -> Prompt:
        """A text gets a BOS in front (special-token strings in it are those tokens, as vLLM reads a prompt, and as
        POST /tokenize gives them); token ids are taken as they are."""
        if isinstance(prompt, str):
            self._fits("prompt", len(prompt))
            return Prompt(self.tokenize(prompt, bos=True), "text", start=1)
        self.check_ids("prompt", prompt)
        return Prompt(list(prompt), "text")

    def tokenize(self, text: str, bos: bool) -> list[int]:
        return self.tokenizer.encode(text, bos=bos, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        self.check_ids("tokens", tokens)
        return self.tokenizer.decode(tokens)

    def check_ids(self, field: str, tokens: list[int]) -> None:
        vocab = self.member.vocab_size
        if bad := [t for t in tokens if not 0 <= t < vocab]:
            raise invalid(field, f"token ids must be in [0, {vocab}), got {bad[0]}")

    def room(self, prompt: Prompt, max_tokens: int | None) -> int:
        """The tokens to sample: max_tokens, checked against the context (None: all the room there is)."""
        seq_len, length = self.member.seq_len, len(prompt.tokens)
        room = seq_len - length
        if max_tokens is None:
            if room < 1:
                raise invalid(prompt.field, f"{length} tokens leave no room in this model's context of "
                                            f"{seq_len} tokens", "context_length_exceeded")
            return room
        if max_tokens > room:
            raise invalid(prompt.field if room < 0 else "max_tokens",
                          f"this model's context is {seq_len} tokens and the prompt has {length}, so max_tokens "
                          f"can be at most {max(room, 0)}; got {max_tokens}", "context_length_exceeded")
        return max_tokens

    def request(self, prompt: Prompt, req: Sampling, logprobs: int | None = None,
                echo: bool = False) -> GenerateRequest:
        """The replica's request. logprobs: None, or alternatives per token to report; echo: the prompt's
        tokens come back first (scored by the replica where logprobs are asked)."""
        max_tokens = self.room(prompt, req.most_tokens)
        bias = tuple((int(t), b) for t, b in (req.logit_bias or {}).items())
        if bad := [t for t, _ in bias if t >= self.member.vocab_size]:
            raise invalid("logit_bias", f"token ids must be in [0, {self.member.vocab_size}), got {bad[0]}")
        sampling = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k or None,
                                  top_p=req.top_p, seed=req.seed, logprobs=logprobs or 0, logit_bias=bias,
                                  presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty) if max_tokens else None
        # Completions with logprobs or echo end with the stop token that ended them (text "", its logprob), as
        # vLLM does: lm-eval-harness's loglikelihood (echo, logprobs, max_tokens 1) slices
        # token_logprobs[ctxlen:-1] and would otherwise lose a prompt token.
        return GenerateRequest(prompt=prompt.tokens, sampling=sampling, stop_ids=self.stop_ids[prompt.kind],
                               score_prompt=logprobs if echo and logprobs is not None else None,
                               score_stop=prompt.kind == "text" and (logprobs is not None or echo))

    def echo(self, prompt: Prompt, scored: list[Token] | None) -> list[Piece]:
        """The client's own prompt tokens as pieces of text, with their scores where the replica sent them.
        The first has no logprob (null, as OpenAI and vLLM give it), even after a BOS the server added."""
        tokens = (scored or [Token(id=t, logprob=None) for t in prompt.tokens])[prompt.start:]
        if tokens:
            tokens[0] = Token(id=tokens[0].id, logprob=None)
        decoder = TextStream(self.tokenizer)
        pieces = [Piece(decoder.feed(t.id), t) for t in tokens]
        if pieces:
            pieces[-1] = Piece(pieces[-1].text + decoder.flush(), pieces[-1].token)
        return pieces

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.encoding.decode_single_token_bytes(token)


class Reply:
    """One request's reply, opened: its first event has arrived (so a replica that fails does so before any
    response starts). Iterating yields its text in pieces, cut at the first stop string, and then sets
    finish_reason and completion_tokens; closing it early cancels the request on the replica, which frees
    its engine slot."""

    def __init__(self, text: DepthText, prompt: Prompt, stream, first: Event, stops: list[str], echo: bool):
        self.text, self.prompt, self.stream, self.first = text, prompt, stream, first
        self.stops, self.echo = stops, echo
        self.prompt_tokens = len(prompt.tokens) - prompt.start  # what the client sent, as OpenAI counts it
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.ended = isinstance(first, Finish)  # the replica is done with it (else closing cancels it there)

    @classmethod
    async def open(cls, text: DepthText, prompt: Prompt, stream, stops: Sequence[str] = (),
                   echo: bool = False) -> "Reply":
        """Wait for the first event of `stream` (the replica's generate); on failure, cancel it there."""
        try:
            first = await stream.__anext__()
        except BaseException:
            stream.cancel()
            raise
        return cls(text, prompt, stream, first, list(stops), echo)

    def cancel(self) -> None:
        """Stop the request on its replica, unless it has ended there."""
        if not self.ended:
            self.ended = True
            self.stream.cancel()

    async def _events(self) -> AsyncIterator[Event]:
        yield self.first
        async for event in self.stream:
            yield event

    async def __aiter__(self) -> AsyncIterator[Piece]:
        decoder, stops = TextStream(self.text.tokenizer), StopScanner(self.stops)
        try:
            if self.echo and not isinstance(self.first, Echo):  # an echo without scores: the tokens are here
                for piece in self.text.echo(self.prompt, None):
                    yield piece
            async for event in self._events():
                if isinstance(event, Echo):
                    for piece in self.text.echo(self.prompt, event.prompt):
                        yield piece
                elif isinstance(event, Token):
                    self.completion_tokens += 1
                    text, hit = stops.feed(decoder.feed(event.id))
                    yield Piece(text, event)
                    if hit:
                        self.finish_reason = "stop"
                        return
                else:
                    self.ended = True
                    text, hit = stops.feed(decoder.flush())
                    text += "" if hit else stops.flush()
                    if text:
                        yield Piece(text)
                    if event.stop_token is not None and not hit:
                        self.completion_tokens += 1
                        yield Piece("", event.stop_token)
                    self.finish_reason = "stop" if hit else event.reason
                    return
        finally:
            self.cancel()
