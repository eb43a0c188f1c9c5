"""One depth's deployment: an inference engine behind a streaming `generate` that the ingress (serve/routes.py)
calls through a DeploymentHandle. Token ids in, token ids out: the ingress has rendered, tokenized and checked
the request (serve/text.py) and turns the tokens back into text; the engine batches every request in flight.
"""

import asyncio
from contextlib import aclosing
from typing import AsyncIterator

from ray import serve

from nanoray.engine import Engine
from serve.family import Member
from serve.schemas import Echo, Event, Finish, GenerateRequest, Token

HEALTH_TIMEOUT_S = 20


@serve.deployment(health_check_period_s=10, health_check_timeout_s=HEALTH_TIMEOUT_S + 10,
                  graceful_shutdown_timeout_s=20)
class DepthModel:
    """One depth's engine. `generate` streams one request's events; the engine batches every request in
    flight on this replica."""

    def __init__(self, member: Member, max_batch: int):
        self.member = member
        self.engine = Engine.from_checkpoint(member.checkpoint, max_batch=max_batch)

    async def check_health(self) -> None:
        """Scores two tokens on the engine's thread: raises (Serve then replaces this replica) if that
        thread no longer runs or hangs."""
        bos = self.engine.tokenizer.bos_id
        await asyncio.wait_for(self.engine.score_async([bos, bos]), HEALTH_TIMEOUT_S)

    def stats(self) -> dict:
        return self.engine.stats()

    def __del__(self):  # Serve calls it when the replica stops (also one whose __init__ failed)
        if hasattr(self, "engine"):
            self.engine.close()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """One request's events: Echo (the prompt scored) if asked, then a Token per sampled token, then
        Finish. Closing the stream early cancels the request, freeing its engine slot at the next step."""
        prompt, sampling = request.prompt, request.sampling
        if request.score_prompt is not None:
            scored = await self.engine.score_async(prompt, request.score_prompt)
            yield Echo(prompt=[Token(id=t, logprob=s and s["logprob"], top=s["top"] if s else {})
                               for t, s in zip(prompt, scored)])
        generated = []
        if sampling is not None:
            stream = self.engine.stream_with_logprobs(prompt, sampling, set(request.stop_ids))
            async with aclosing(stream) as tokens:
                async for token, logprob, top in tokens:
                    generated.append(token)
                    yield Token(id=token, logprob=logprob, top=top)
        full = sampling is None or len(generated) == sampling.max_tokens \
            or len(prompt) + len(generated) >= self.member.seq_len
        stop_token = None
        if request.score_stop and not full:  # the engine ended on a stop token, which it does not yield
            stop_token = await self._stop_token(prompt + generated, request.stop_ids, sampling.logprobs)
        yield Finish(reason="length" if full else "stop", stop_token=stop_token)

    async def _stop_token(self, tokens: list[int], stop_ids: list[int], top: int) -> Token:
        """The stop token that ended a request after `tokens`, scored by the model. With one stop id (text
        prompts) it is that one; with several, the most likely of them."""
        scored = [(await self.engine.score_async(tokens + [s], top))[-1] for s in stop_ids]
        i = max(range(len(stop_ids)), key=lambda j: scored[j]["logprob"])
        return Token(id=stop_ids[i], logprob=scored[i]["logprob"], top=scored[i]["top"])
