"""Inference for one GPT: prefill, KV-cache decode, sampling, and continuous batching behind an async API.

    engine = Engine.from_checkpoint("runs/d12")                  # cuda if available, else cpu
    prompt = nanoray.tokenizer.render_chat(engine.tokenizer, [{"role": "user", "content": "Why is the sky blue?"}])
    done = await engine.generate(prompt, SamplingParams(max_tokens=64, temperature=0))
    async for token in engine.stream(prompt, SamplingParams(seed=1)): ...

One background thread owns the model. The KV cache has `max_batch` slots, each holding one request at its
own length. Between decode steps the thread prefills waiting requests (batch 1) into the lowest free slots;
each decode step then feeds the last token of every active slot through one forward at per-row positions
(nanoray.model.KVCache), samples, and hands each token to its request's asyncio.Queue on the caller's event
loop. A step runs over the smallest power-of-two prefix of slots that holds every active one and attends over
a power-of-two prefix of positions; on a GPU each (slots, positions) shape is captured once as a CUDA graph
and replayed (with `compile_decode`, an opt-in until measured, the step is torch.compiled first). Sampling is Gumbel-max over each row's top-k/top-p set (after the row's logit bias and repetition penalties, where it has
any), with noise hashed from (seed, step, rank), so a seeded request draws the same tokens whatever else is in
the batch.

Shape legend: B slots in a step, V vocab, K candidates (top-k).
"""

import asyncio
import concurrent.futures
import os
import threading
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from nanoray.checkpoint import load_for_inference
from nanoray.hardware import compute_dtype
from nanoray.model import GPT, KVCache
from nanoray.tokenizer import Tokenizer

MAX_LOGPROBS = 20
MIN_ATTEND = 64  # the shortest attention prefix a decode step uses (the rest are powers of two)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # most tokens to generate (also clipped to the context)
    temperature: float = 0.8  # 0 = greedy (argmax)
    top_k: int | None = 50  # sample among the k most likely tokens; None or 0 = off
    top_p: float | None = None  # nucleus: the smallest set holding this probability; None = off
    seed: int | None = None  # same seed + prompt + params -> same tokens, whatever runs alongside; None = random
    logprobs: int = 0  # alternatives per sampled token that stream_with_logprobs reports (0-20)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias): added to the token's logit before sampling
    presence_penalty: float = 0.0  # subtracted from the logit of each token the reply already holds
    frequency_penalty: float = 0.0  # ... times the number of times it holds it (OpenAI's penalties)

    def __post_init__(self):
        checks = [("max_tokens", self.max_tokens >= 1, ">= 1"),
                  ("temperature", 0 <= self.temperature <= 2, "in [0, 2]"),
                  ("top_k", self.top_k is None or self.top_k >= 0, ">= 0 or None"),
                  ("top_p", self.top_p is None or 0 < self.top_p <= 1, "in (0, 1] or None"),
                  ("logprobs", 0 <= self.logprobs <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]"),
                  ("logit_bias", all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
                   "(token >= 0, bias in [-100, 100]) pairs"),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}: must be {allowed}, got {getattr(self, name)!r}")


@dataclass
class Completion:
    tokens: list[int]  # generated tokens, stop token excluded
    text: str
    finish_reason: str  # "stop" (a stop token) | "length" (max_tokens or the context is full)
    prompt_tokens: int


def _hash32(x):
    """A 32-bit integer hash (multiply-xorshift rounds) of ints or int64 tensors; products stay below 2**63."""
    for mult in (0x7FEB352D, 0x2C1B3C6D):
        x = ((x ^ (x >> 16)) * mult) & 0xFFFFFFFF
    return x ^ (x >> 16)


def noise_key(seed: int, step: int) -> int:
    """The 32-bit key of a request's noise at one step (host side; the ranks are mixed in on the device). A
    seed's bits above 32 are mixed in as well (seeds below 2**32 keep their keys), so seeds that differ only
    there draw differently at every step: each round is a bijection of 32-bit values."""
    key = _hash32(_hash32(seed & 0xFFFFFFFF) ^ step)
    return int(_hash32(key ^ _hash32(seed >> 32)) if seed >> 32 else key)


def gumbel_noise(key_B: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) standard Gumbel noise, candidate rank r of row b a hash of (key_B[b], r). The uniforms take 23
    bits, (i + 0.5) / 2**23, so they lie strictly inside (0, 1) in fp32 and the noise stays finite (24 bits
    would round the top value to 1.0: noise +inf, and -inf + inf = NaN for a masked candidate)."""
    rank_K = torch.arange(k, device=key_B.device)
    uniform_BK = ((_hash32(key_B[:, None] ^ rank_K) >> 9).float() + 0.5) / 2**23
    return -torch.log(-torch.log(uniform_BK))


def sample(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor,
           key_B: torch.Tensor, k_max: int) -> torch.Tensor:
    """One token per row: Gumbel-max over the row's top-k (then top-p) candidates at its temperature.
    Greedy rows come with top_k 1. The noise of candidate rank r is a hash of (key_B, r), so there is no
    generator state and a row's draw does not depend on the other rows. k_max >= every top_k_B."""
    logits_BK, ids_BK = (logits_BV / temperature_B[:, None]).topk(k_max, dim=-1)
    in_k_BK = torch.arange(k_max, device=logits_BV.device) < top_k_B[:, None]
    logits_BK = logits_BK.masked_fill(~in_k_BK, -torch.inf)
    probs_BK = logits_BK.softmax(dim=-1)
    keep_BK = in_k_BK & (probs_BK.cumsum(dim=-1) - probs_BK < top_p_B[:, None])  # the nucleus, at least rank 0
    choice_B = (logits_BK + gumbel_noise(key_B, k_max)).masked_fill(~keep_BK, -torch.inf).argmax(dim=-1)
    return ids_BK.gather(1, choice_B[:, None])[:, 0]


def decode_step(model: GPT, cache: KVCache, idx_B: torch.Tensor, pos_B: torch.Tensor, length: int) -> torch.Tensor:
    """Logits (B, V) of one token for each of the cache's first B rows, row b at position pos_B[b], attending
    over the first `length` positions; writes those rows' keys, values and smear state into the cache's whole
    tensors in place. The function the engine compiles (one graph per (B, length))."""
    return model(idx_B[:, None], cache=cache.view(slice(0, idx_B.size(0)), length, pos_B))[:, 0]


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int]
    seed: int
    max_new: int  # max_tokens clipped to the context
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    slot: int = -1
    generated: int = 0
    last: int = -1  # the latest sampled token, fed at the next step
    cancelled: bool = False
    finish_reason: str | None = None
    counts: dict[int, int] = field(default_factory=dict)  # sampled tokens, where the params penalize repeats

    def adjustments(self) -> list[tuple[int, float]]:
        """(token, what to add to its logit) for the logit bias and the repetition penalties."""
        p = self.params
        return [*p.logit_bias, *((t, -(p.frequency_penalty * n + p.presence_penalty)) for t, n in self.counts.items())]

    async def next(self) -> tuple | None:
        """The next (token, logprob, top) or None once finished; raises the engine's error, if any."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, str):
            self.finish_reason = item
            return None
        return item


class Engine:
    """Continuous-batching generation over a fixed pool of `max_batch` KV-cache slots (module docstring)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 32, cuda_graphs: bool = True,
                 compile_decode: bool = False):
        """cuda_graphs: replay decode and sampling steps as CUDA graphs (GPU only). compile_decode: torch.compile
        the decode step, one graph per (slots, positions) bucket, to fuse each layer's small kernels; off until
        measured on a GPU (equal to eager on CPU; each new bucket costs a compile at its first request).
        Either falls back to eager, with a warning, where it fails."""
        self.device = model.wte.weight.device
        self.model = model.prepare_inference(compute_dtype(self.device))
        self.tokenizer, self.max_batch, self.seq_len = tokenizer, max_batch, model.config.seq_len
        self.vocab_size = model.config.vocab_size
        self.default_stop_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id}
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.cache = KVCache(model.config, max_batch, self.seq_len, self.device, compute_dtype(self.device))
        self.compile_decode = compile_decode
        self._compiled_decode = torch.compile(decode_step, fullgraph=True, dynamic=False)
        # Static buffers, which the CUDA graphs read and write: decode inputs (token ids, positions), logits,
        # sampling parameters (temperature, top_p; top_k, noise key) and results (token, its logprob).
        self._inputs = torch.zeros(2, max_batch, dtype=torch.long, device=self.device)
        self._logits = torch.zeros(max_batch, self.vocab_size, device=self.device)
        self._params = torch.zeros(2, max_batch, device=self.device)
        self._keys = torch.zeros(2, max_batch, dtype=torch.long, device=self.device)
        self._sampled = torch.zeros(2, max_batch, dtype=torch.float64, device=self.device)
        self._bias = torch.zeros(max_batch, self.vocab_size, device=self.device)  # logit bias and penalties
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._slots: list[_Request | None] = [None] * max_batch
        self._waiting: list[_Request] = []
        self._jobs: list = []  # score() calls, run on the engine thread between steps
        self._steps = self._generated = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="nanoray-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_checkpoint(cls, path, device: str | None = None, max_batch: int = 32, **kwargs) -> "Engine":
        model, tokenizer, _ = load_for_inference(path, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, tokenizer, max_batch=max_batch, **kwargs)

    # ------------------------------------------------------------------------------------ public API

    async def stream(self, prompt: list[int], params: SamplingParams,
                     stop_ids: set[int] | None = None) -> AsyncIterator[int]:
        """Each sampled token as soon as it is sampled; ends after a stop token (not yielded) or max_tokens.
        stop_ids: the tokens that end the request (None: <|assistant_end|> and <|bos|>; set(): none).
        A bad prompt raises ValueError at the first iteration. Closing the iterator early (or cancelling its
        task) frees the request's slot at the next step."""
        request = self._submit(prompt, params, stop_ids)
        try:
            while (item := await request.next()) is not None:
                yield item[0]
        finally:
            self._cancel(request)

    async def stream_with_logprobs(self, prompt: list[int], params: SamplingParams,
                                   stop_ids: set[int] | None = None) -> AsyncIterator[tuple[int, float, dict]]:
        """Like stream, yielding (token, logprob, {token: logprob} of the params.logprobs most likely), the
        logprobs being the model's own (log-softmax of the logits, before temperature and filtering)."""
        request = self._submit(prompt, params, stop_ids)
        try:
            while (item := await request.next()) is not None:
                yield item
        finally:
            self._cancel(request)

    async def generate(self, prompt: list[int], params: SamplingParams, stop_ids: set[int] | None = None) -> Completion:
        request = self._submit(prompt, params, stop_ids)
        tokens = []
        try:
            while (item := await request.next()) is not None:
                tokens.append(item[0])
        finally:
            self._cancel(request)
        return Completion(tokens, self.tokenizer.decode(tokens), request.finish_reason, len(prompt))

    def score(self, tokens: list[int], top_logprobs: int = 0) -> list[dict | None]:
        """Teacher-forced logprobs: entry i > 0 is {"logprob": log p(tokens[i] | tokens[:i]), "top": {token:
        logprob} of the top_logprobs most likely}; entry 0 is None. Blocks until the engine thread ran it."""
        return self._score_future(tokens, top_logprobs).result()

    async def score_async(self, tokens: list[int], top_logprobs: int = 0) -> list[dict | None]:
        return await asyncio.wrap_future(self._score_future(tokens, top_logprobs))

    def stats(self) -> dict:
        return dict(active=sum(r is not None for r in self._slots), queued=len(self._waiting), steps=self._steps,
                    generated_tokens=self._generated, max_batch=self.max_batch)

    def close(self) -> None:
        """Stops the engine thread; requests still running end with a RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # ------------------------------------------------------------------------- requests (caller side)

    def _check_tokens(self, tokens: list[int], name: str, most: int) -> None:
        if not tokens:
            raise ValueError(f"{name}: needs at least one token")
        if len(tokens) > most:
            raise ValueError(f"{name} has {len(tokens)} tokens; the context is {self.seq_len}")
        if not all(0 <= t < self.vocab_size for t in tokens):
            raise ValueError(f"{name}: token ids must be in [0, {self.vocab_size})")

    def _submit(self, prompt: list[int], params: SamplingParams, stop_ids: set[int] | None) -> _Request:
        self._check_tokens(prompt, "prompt", self.seq_len - 1)
        if any(t >= self.vocab_size for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias: token ids must be in [0, {self.vocab_size})")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4))
        request = _Request(list(prompt), params, self.default_stop_ids if stop_ids is None else set(stop_ids),
                           seed, min(params.max_tokens, self.seq_len - len(prompt)),
                           asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def _score_future(self, tokens: list[int], top_logprobs: int) -> concurrent.futures.Future:
        self._check_tokens(tokens, "tokens", self.seq_len)
        if not 0 <= top_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs: must be in [0, {MAX_LOGPROBS}], got {top_logprobs}")
        future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._jobs.append((future, tokens, top_logprobs))
            self._cond.notify()
        return future

    def _cancel(self, request: _Request) -> None:
        """The consumer has gone (or finished): the engine thread frees the slot at its next step."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    # -------------------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with torch.no_grad():
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._waiting or self._jobs or self._active())
                    if self._closed:
                        break
                    jobs, self._jobs = self._jobs, []
                    admitted = self._admit()
                for future, tokens, top in jobs:
                    try:
                        future.set_result(self._score(tokens, top))
                    except Exception as e:
                        future.set_exception(e)
                in_flight = self._active()  # the admitted ones included
                try:
                    for request in admitted:
                        self._prefill(request)
                    for request in self._active():
                        if request.cancelled:
                            self._free(request)
                    if self._active():
                        self._step()
                except Exception as e:  # fails the requests in flight (a finished one ignores it), not the engine
                    for request in in_flight:
                        self._finish(request, e)
        with self._cond:
            for request in self._active() + self._waiting:
                self._finish(request, RuntimeError("engine closed"))
            self._waiting = []

    def _active(self) -> list[_Request]:
        return [r for r in self._slots if r is not None]

    def _admit(self) -> list[_Request]:
        """Waiting requests into the lowest free slots (keeps the active rows in a short prefix)."""
        self._waiting = [r for r in self._waiting if not r.cancelled]
        admitted = []
        for slot, occupant in enumerate(self._slots):
            if occupant is None and self._waiting:
                request = self._waiting.pop(0)
                request.slot, self._slots[slot] = slot, request
                admitted.append(request)
        return admitted

    def _prefill(self, request: _Request) -> None:
        if request.cancelled:
            return self._free(request)
        view = self.cache.view(slice(request.slot, request.slot + 1), self.seq_len, 0)
        self._logits[:1].copy_(self.model(self._to_device([request.prompt]), cache=view)[:, -1])
        self._emit([request], rows=[0], B=1)

    def _step(self) -> None:
        """One decode step for every active slot: the smallest power-of-two prefix of slots and of positions."""
        active = self._active()
        B = min(self.max_batch, _pow2(max(r.slot for r in active) + 1))
        idx, pos = [0] * B, [0] * B
        for r in active:
            idx[r.slot], pos[r.slot] = r.last, len(r.prompt) + r.generated - 1
        length = min(self.seq_len, max(MIN_ATTEND, _pow2(max(pos) + 1)))
        self._inputs[:, :B].copy_(self._to_device([idx, pos]))
        self._replay(("decode", B, length), lambda: self._logits[:B].copy_(self._decode(B, length)))
        self._steps += 1
        self._emit(active, rows=[r.slot for r in active], B=B)

    def _decode(self, B: int, length: int) -> torch.Tensor:
        """Logits (B, V) of one token per slot, from the static inputs (token ids, positions)."""
        args = (self.model, self.cache, self._inputs[0, :B], self._inputs[1, :B], length)
        if self.compile_decode:
            try:  # one graph per (B, length): the buckets bound them (log2 of each), for every engine in the process
                with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.accumulated_recompile_limit):
                    return self._compiled_decode(*args)
            except Exception as e:  # an op this torch cannot compile: stay correct, run eagerly from now on
                warnings.warn(f"nanoray.engine: torch.compile of the decode step failed, decoding eagerly: {e}")
                self.compile_decode = False
        return decode_step(*args)

    def _sample(self, B: int, k_max: int, biased: bool) -> None:
        """Static logits (plus the static bias, where biased) and parameters of B rows -> static (token, logprob)
        per row; the logprob is the model's own, of the logits before the bias."""
        logits_BV = self._logits[:B]
        tokens_B = sample(logits_BV + self._bias[:B] if biased else logits_BV, self._params[0, :B],
                          self._keys[0, :B], self._params[1, :B], self._keys[1, :B], k_max)
        self._sampled[0, :B] = tokens_B
        self._sampled[1, :B] = logits_BV.log_softmax(dim=-1).gather(1, tokens_B[:, None])[:, 0]

    def _replay(self, key: tuple, step) -> None:
        """Run `step` (which touches only the static buffers and the cache), on a GPU as a CUDA graph
        captured on first use. The capture's warm-up run (kernel selection, Triton compiles) writes what the
        real run writes, except the smear state that a decode step advances, which is put back."""
        if not self.cuda_graphs:
            return step()
        if key not in self._graphs:
            prev_emb = self.cache.prev_emb.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            self.cache.prev_emb.copy_(prev_emb)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    step()
            except RuntimeError as e:  # an op this torch cannot capture: stay correct, run eagerly from now on
                warnings.warn(f"nanoray.engine: CUDA graph capture failed, decoding eagerly: {e}")
                self.cuda_graphs = False
                return step()
            self._graphs[key] = graph
        self._graphs[key].replay()

    def _to_device(self, data: list, dtype=torch.long) -> torch.Tensor:
        """A small host list on the device, copied from pinned memory without stalling the host."""
        pinned = self.device.type == "cuda"
        return torch.tensor(data, dtype=dtype, pin_memory=pinned).to(self.device, non_blocking=pinned)

    def _emit(self, requests: list[_Request], rows: list[int], B: int) -> None:
        """Sample the requests' tokens from their rows of the static logits (B rows, the others greedy
        placeholders), then deliver each token (and the finish, if any) to its request's event loop."""
        temperature, top_p, top_k, key = [1.0] * B, [torch.inf] * B, [1] * B, [0] * B
        for r, row in zip(requests, rows):
            temperature[row] = r.params.temperature or 1.0
            top_p[row] = r.params.top_p if (r.params.top_p or 1) < 1 else torch.inf
            top_k[row] = 1 if r.params.temperature == 0 else min(r.params.top_k or self.vocab_size, self.vocab_size)
            key[row] = noise_key(r.seed, r.generated)
        k_max = min(self.vocab_size, _pow2(max(top_k)))
        self._params[:, :B].copy_(self._to_device([temperature, top_p], torch.float32))
        self._keys[:, :B].copy_(self._to_device([top_k, key]))
        biased = self._set_bias(requests, rows, B)
        self._replay(("sample", B, k_max, biased), lambda: self._sample(B, k_max, biased))
        tokens, chosen = self._sampled[:, :B].tolist()
        n_top = max(r.params.logprobs for r in requests)
        if n_top:
            top_values, top_ids = (t.tolist() for t in self._logits[rows].log_softmax(dim=-1).topk(n_top, dim=-1))
        deliveries = []
        for i, (request, row) in enumerate(zip(requests, rows)):
            token = int(tokens[row])
            if token in request.stop_ids:
                deliveries.append((request, "stop"))
                self._free(request)
                continue
            n = request.params.logprobs
            top = dict(zip(top_ids[i][:n], top_values[i][:n])) if n else {}
            deliveries.append((request, (token, chosen[row], top)))
            request.generated, request.last = request.generated + 1, token
            if request.params.presence_penalty or request.params.frequency_penalty:
                request.counts[token] = request.counts.get(token, 0) + 1
            self._generated += 1
            if request.generated == request.max_new:
                deliveries.append((request, "length"))
                self._free(request)
        self._deliver(deliveries)

    def _set_bias(self, requests: list[_Request], rows: list[int], B: int) -> bool:
        """The requests' logit bias and penalties into the static bias' first B rows, in one scatter; False
        (and the buffer untouched) where none has any."""
        entries = [(row, token, value) for r, row in zip(requests, rows) for token, value in r.adjustments()]
        if not entries:
            return False
        rows_E, tokens_E, values_E = zip(*entries)
        self._bias[:B].zero_()
        self._bias.index_put_((self._to_device(list(rows_E)), self._to_device(list(tokens_E))),
                              self._to_device(list(values_E), torch.float32), accumulate=True)
        return True

    def _free(self, request: _Request) -> None:
        if request.slot >= 0 and self._slots[request.slot] is request:
            self._slots[request.slot] = None

    def _finish(self, request: _Request, error: BaseException) -> None:
        self._free(request)
        self._deliver([(request, error)])

    @staticmethod
    def _deliver(deliveries: list[tuple[_Request, object]]) -> None:
        """Hand items to their requests' queues: one call_soon_threadsafe per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request, item in deliveries:
            by_loop.setdefault(request.loop, []).append((request.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _score(self, tokens: list[int], top_logprobs: int) -> list[dict | None]:
        logprobs_TV = self.model(self._to_device([tokens]))[0].log_softmax(dim=-1)
        chosen = logprobs_TV[:-1].gather(1, self._to_device(tokens[1:])[:, None])[:, 0].tolist()
        top = logprobs_TV[:-1].topk(top_logprobs, dim=-1) if top_logprobs else None
        tops = [dict(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())] if top_logprobs \
            else [{}] * len(chosen)
        return [None] + [{"logprob": lp, "top": t} for lp, t in zip(chosen, tops)]


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
