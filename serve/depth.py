"""One depth's deployment: an inference engine behind a streaming `generate` that the ingress (serve/app.py)
calls through a DeploymentHandle. Here the prompt is tokenized (chat turns or text), checked against the
context, sampled, cut at stop strings, and given logprobs; the engine batches every request in flight.
"""

import asyncio
from contextlib import aclosing
from typing import AsyncIterator

from ray import serve

from serve.family import Member

SPECIAL_STOPS = {"chat": ("<|assistant_end|>", "<|bos|>"), "text": ("<|bos|>",)}
HEALTH_TIMEOUT_S = 20


class StopScanner:
    """Cuts streamed text at the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class RequestError(ValueError):
    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(param, message, code)
        message = message if message.startswith(param) else f"{param}: {message}"
        self.body = dict(message=message, type="invalid_request_error", param=param, code=code)


@serve.deployment(health_check_period_s=10, health_check_timeout_s=HEALTH_TIMEOUT_S + 10,
                  graceful_shutdown_timeout_s=20)
class DepthModel:
    """One depth's engine. `generate` streams events for one request (see its docstring); the engine
    batches every request in flight on this replica."""

    def __init__(self, member: Member, max_batch: int):
        from nanoray.engine import Engine

        self.member = member
        self.engine = Engine.from_checkpoint(member.checkpoint, max_batch=max_batch)
        self.tokenizer = self.engine.tokenizer
        self.stop_ids = {kind: [self.tokenizer.encode_special(t) for t in names]
                         for kind, names in SPECIAL_STOPS.items()}

    async def check_health(self) -> None:
        """Scores two tokens on the engine's thread: raises (Serve then replaces this replica) if that
        thread no longer runs or hangs."""
        bos = self.tokenizer.bos_id
        await asyncio.wait_for(asyncio.to_thread(self.engine.score, [bos, bos]), HEALTH_TIMEOUT_S)

    def stats(self) -> dict:
        return self.engine.stats()

    def __del__(self):  # Serve calls it when the replica stops
        self.engine.close()

    def _prompt(self, job: dict) -> tuple[list[int], int]:
        """The prompt's tokens and where the caller's own tokens start (after an added BOS)."""
        from nanoray.tokenizer import render_chat

        if job["messages"] is not None:
            try:
                return render_chat(self.tokenizer, job["messages"]), 0
            except ValueError as e:  # it names the message: "messages[2].role: ..."
                param = str(e).split(":")[0]
                raise RequestError(param if param.startswith("messages") else "messages", str(e)) from None
        prompt = job["prompt"]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=True), 1
        bad = [t for t in prompt if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise RequestError("prompt", f"token ids must be in [0, {self.tokenizer.vocab_size}), got {bad[0]}")
        return list(prompt), 0

    def _max_tokens(self, job: dict, prompt_len: int) -> int:
        seq_len, field = self.member.seq_len, "messages" if job["messages"] is not None else "prompt"
        room = seq_len - prompt_len
        if job["max_tokens"] is None:
            if room < 1:
                raise RequestError(field, f"{prompt_len} tokens leave no room in this model's context of "
                                          f"{seq_len} tokens", "context_length_exceeded")
            return room
        if job["max_tokens"] > room:
            param = field if room < 0 else "max_tokens"
            raise RequestError(param, f"this model's context is {seq_len} tokens and the prompt has {prompt_len}, "
                                      f"so max_tokens can be at most {max(room, 0)}; got {job['max_tokens']}",
                               "context_length_exceeded")
        return job["max_tokens"]

    def _token(self, token: int, logprob: float | None, top: dict[int, float] | None) -> dict:
        """A token with its logprob and alternatives, in OpenAI's chat logprobs shape."""
        def entry(t, lp):
            raw = self.tokenizer.encoding.decode_single_token_bytes(t)
            return dict(token=raw.decode("utf-8", errors="replace"), logprob=lp, bytes=list(raw))
        return dict(entry(token, logprob), top_logprobs=[entry(t, lp) for t, lp in (top or {}).items()])

    async def _sample(self, prompt: list[int], params, stop_ids: list[int], top_k: int | None):
        """(token, its logprob entry, or None when top_k is None) as sampled."""
        async with aclosing(self.engine.stream_with_logprobs(prompt, params, stop_ids)) as tokens:
            async for token, logprob, top in tokens:
                yield token, None if top_k is None else self._token(token, logprob, top)

    async def generate(self, job: dict) -> AsyncIterator[dict]:
        """One request's events: first {"error": body} (and nothing more) or {"prompt_tokens", "echo"}; then
        one {"id", "text", "logprobs"} per sampled token (text may be held back: partial UTF-8, a possible
        stop string); a {"text"} with what was held back; last {"finish_reason", "completion_tokens"}.

        job: messages (chat) or prompt (text or token ids); max_tokens (None: up to the context),
        temperature, top_k, top_p, seed; stop (strings); logprobs (None, or how many alternatives);
        echo (the prompt's tokens, with logprobs when asked, in the first event)."""
        from nanoray.engine import SamplingParams
        from nanoray.tokenizer import TextStream

        try:
            prompt, start = self._prompt(job)
            max_tokens = self._max_tokens(job, len(prompt))
            params = SamplingParams(max_tokens=max(max_tokens, 1), temperature=job["temperature"],
                                    top_k=job["top_k"] or None, top_p=job["top_p"], seed=job["seed"],
                                    logprobs=job["logprobs"] or 0)
        except RequestError as e:
            yield {"error": e.body}
            return
        top_k = job["logprobs"]
        echo = None
        if job["echo"]:
            scored = None if top_k is None else await asyncio.to_thread(self.engine.score, prompt, top_k)
            decoder = TextStream(self.tokenizer)
            echo = [dict(id=t, text=decoder.feed(t),
                         logprobs=None if scored is None else self._token(t, scored[i] and scored[i]["logprob"],
                                                                           scored[i] and scored[i]["top"]))
                    for i, t in enumerate(prompt) if i >= start]
            if echo:
                echo[-1]["text"] += decoder.flush()
        yield {"prompt_tokens": len(prompt), "echo": echo}

        text, stops = TextStream(self.tokenizer), StopScanner(job["stop"])
        count, hit, generated = 0, False, []
        kind = "chat" if job["messages"] is not None else "text"
        if max_tokens:
            async with aclosing(self._sample(prompt, params, self.stop_ids[kind], top_k)) as sampled:
                async for token, logprobs in sampled:
                    count += 1
                    generated.append(token)
                    piece, hit = stops.feed(text.feed(token))
                    yield {"id": token, "text": piece, "logprobs": logprobs}
                    if hit:
                        break
        if not hit:
            piece, hit = stops.feed(text.flush())
            piece += "" if hit else stops.flush()
            if piece:
                yield {"text": piece}
        full = count == max_tokens or len(prompt) + count >= self.member.seq_len
        if max_tokens and not full and not hit and job["messages"] is None and (top_k is not None or job["echo"]):
            # The engine ended on a stop token, which it does not yield. Completions with logprobs or echo
            # get it as a last piece (text "", its logprob), as vLLM does: lm-eval-harness's loglikelihood
            # (echo, logprobs, max_tokens 1) slices token_logprobs[ctxlen:-1] and would otherwise lose a
            # prompt token.
            yield await self._stop_piece(prompt + generated, self.stop_ids[kind], top_k)
            count += 1
        yield {"finish_reason": "length" if full and not hit else "stop", "completion_tokens": count}

    async def _stop_piece(self, tokens: list[int], stop_ids: list[int], top_k: int | None) -> dict:
        """The stop token that ended a request after `tokens` as a piece {"id", "text": "", "logprobs"}, scored
        by the model. With one stop id (text prompts) it is that one; with several, the most likely of them."""
        scored = [(await self.engine.score_async(tokens + [s], top_k or 0))[-1] for s in stop_ids]
        i = max(range(len(stop_ids)), key=lambda j: scored[j]["logprob"])
        logprobs = None if top_k is None else self._token(stop_ids[i], scored[i]["logprob"], scored[i]["top"])
        return {"id": stop_ids[i], "text": "", "logprobs": logprobs}
