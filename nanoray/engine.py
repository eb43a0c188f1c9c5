"""Inference for one GPT: prefill, KV-cache decode, sampling, and continuous batching behind an async API.

    engine = Engine.from_checkpoint("runs/d12")                  # cuda if available, else cpu
    prompt = nanoray.tokenizer.render_chat(engine.tokenizer, [{"role": "user", "content": "Why is the sky blue?"}])
    done = await engine.generate(prompt, SamplingParams(max_tokens=64, temperature=0))
    async for token in engine.stream(prompt, SamplingParams(seed=1)): ...

One background thread owns the model. The KV cache has `max_batch` slots, each holding one request at its own
length, and each slot's decode state lives on the device (`Engine._state`: last token, position, noise step,
hashed seed, sampling parameters). Between launches the thread prefills waiting requests (batch 1) into the
lowest free slots and samples their first token. A launch runs `_steps_for(B)` decode steps over the smallest
power-of-two prefix of slots holding every active one; each step feeds every row's last token at its own
position, samples the next one (Gumbel-max over the row's top-k/top-p set at its temperature, after its logit
bias and presence/frequency penalties where it has any, noise hashed from (seed, step, rank), so a seeded request
draws the same tokens whatever else is in the batch) and writes it back
as the next input, all on the device: on a GPU one launch is one CUDA graph replay. The tokens are copied to
pinned host memory asynchronously, and the thread launches the next steps before it reads them, so its work
(delivering tokens to each request's asyncio.Queue on the caller's event loop, stop tokens, admissions,
cancellations) overlaps the GPU's.

Decode paths (`decode_path`): "fused", nanoray.fused_decode's Triton kernels, the default on a CUDA GPU (per-row
positions read on the device, so no length bucket); "compiled", the model's per-row cache forward under
torch.compile (opt-in: slower than fused on the H200, benchmarks/RESULTS.md); "eager", that forward as is (the
CPU path and the reference). The model's forward attends over a power-of-two prefix of positions. A fast path
that fails warns and falls back. score() calls waiting together run as one batched forward.

Shape legend: B slots in a step, V vocab, K candidates (top-k).
"""

import asyncio
import collections
import concurrent.futures
import os
import threading
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from nanoray.checkpoint import load_for_inference
from nanoray.fused_decode import FusedDecoder
from nanoray.fused_decode import available as fused_decode_available
from nanoray.hardware import compute_dtype
from nanoray.model import GPT, KVCache
from nanoray.tokenizer import Tokenizer

MAX_LOGPROBS = 20
MIN_ATTEND = 64  # the shortest attention prefix the model's decode forward uses (the rest are powers of two)
SCORE_TOKENS = 16384  # padded tokens per batched scoring forward (its fp32 logits: 2 GiB at a 32k vocabulary)


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

    @property
    def adjusted(self) -> bool:
        """Whether the logits are changed before sampling (a bias or a penalty)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty)

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


def seed_key(seed: int) -> int:
    """A seed (up to 63 bits) as the 32-bit key the sampler hashes with each step. Seeds below 2**32 keep the
    key they always had; the high bits are mixed in by a bijection of 32-bit values, so seeds that differ only
    there draw differently."""
    key = _hash32(seed & 0xFFFFFFFF)
    return int(key ^ _hash32(seed >> 32) if seed >> 32 else key)


def noise_key(seed: int, step: int) -> int:
    """The 32-bit key of a request's noise at one step (host side; the ranks are mixed in on the device); the
    device computes the same from the slot's seed_key and step."""
    return int(_hash32(seed_key(seed) ^ step))


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
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of items, or an exception
    slot: int = -1
    generated: int = 0
    launched: int = 0  # decode steps launched for it (each feeds one token)
    cancelled: bool = False
    done: bool = False  # finished or freed: the engine thread delivers nothing more
    finish_reason: str | None = None
    _items: collections.deque = field(default_factory=collections.deque)

    @property
    def sampler(self) -> tuple[float, float, int]:
        """(temperature, top_p, top_k) as the sampler takes them: greedy is top-k 1, no top-p is +inf."""
        p = self.params
        top_k = 1 if p.temperature == 0 else p.top_k or _VOCAB_ALL
        return p.temperature or 1.0, p.top_p if (p.top_p or 1) < 1 else torch.inf, top_k

    async def next(self) -> tuple | None:
        """The next (token, logprob, top) or None once finished; raises the engine's error, if any."""
        if not self._items:
            items = await self.queue.get()
            if isinstance(items, BaseException):
                raise items
            self._items.extend(items)
        item = self._items.popleft()
        if isinstance(item, str):
            self.finish_reason = item
            return None
        return item


_VOCAB_ALL = 1 << 62  # top_k "off": clipped to the vocabulary


@dataclass
class _Launch:
    """Decode steps in flight: their tokens land in `host` once `event` has fired."""
    host: torch.Tensor  # (S, B, W): per step and row, token, logprob, then top ids and their logprobs
    event: torch.cuda.Event | None
    rows: list[tuple[_Request, int]]
    n_top: int


class Engine:
    """Continuous-batching generation over a fixed pool of `max_batch` KV-cache slots (module docstring)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 32, cuda_graphs: bool = True,
                 compile_decode: bool = False, fused_decode: bool | None = None,
                 steps_per_launch: int | None = None):
        """cuda_graphs: replay each launch of decode steps as a CUDA graph (GPU only). fused_decode: decode with
        nanoray.fused_decode's Triton kernels (None: wherever they run, i.e. on a CUDA GPU). compile_decode: else
        torch.compile the model's decode forward, one graph per (slots, positions) bucket (each new bucket costs
        a compile at its first request). steps_per_launch: decode steps per launch (tokens per host sync), None:
        by the number of slots (`_steps_for`). A fast path that fails falls back to eager with a warning, and
        `decode_path` says which one runs."""
        self.device = model.wte.weight.device
        self.model = model.prepare_inference(compute_dtype(self.device))
        self.tokenizer, self.max_batch, self.seq_len = tokenizer, max_batch, model.config.seq_len
        self.vocab_size = model.config.vocab_size
        self.default_stop_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id}
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.cache = KVCache(model.config, max_batch, self.seq_len, self.device, compute_dtype(self.device))
        self.steps_per_launch = steps_per_launch
        # Each slot's decode state, on the device: the step reads its inputs there and writes the next ones.
        # _state rows: last token, position, step (of the noise), hashed seed, top_k, active; _fstate rows:
        # temperature, top_p.
        self._state = torch.zeros(len(_STATE), max_batch, dtype=torch.long, device=self.device)
        self._fstate = torch.zeros(2, max_batch, device=self.device)
        self._state[_STATE["top_k"]] = 1
        self._fstate[0] = 1.0
        self._pending_rows: dict[int, tuple[list[int], list[float]]] = {}
        # Per slot, what changes its logits before sampling (only where a request asks): its logit bias, the
        # count of each token its reply holds, and its presence and frequency penalties.
        self._bias = torch.zeros(max_batch, self.vocab_size, device=self.device)
        self._counts = torch.zeros(max_batch, self.vocab_size, device=self.device)
        self._penalty = torch.zeros(2, max_batch, device=self.device)
        self._adjusted_slots: set[int] = set()  # slots whose rows above are not zero
        self._fused = None
        if fused_decode is None:
            fused_decode = fused_decode_available(self.device)
            if self.device.type == "cuda" and not fused_decode:
                _warn_fallback("the fused decode step needs Triton and a bf16 GPU (SM >= 80)")
        if fused_decode:
            try:
                self._fused = FusedDecoder(self.model, self.cache, self._state, self._fstate)
            except Exception as e:
                _warn_fallback(f"the fused decode step does not run here ({e!r})")
        self.compile_decode = compile_decode and self._fused is None
        self._compiled_decode = torch.compile(decode_step, fullgraph=True, dynamic=False)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._events = [torch.cuda.Event() for _ in range(2)] if self.device.type == "cuda" else [None, None]
        self._parity = 0
        self._inflight: _Launch | None = None
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._slots: list[_Request | None] = [None] * max_batch
        self._waiting: list[_Request] = []
        self._jobs: list = []  # score() calls, run on the engine thread between launches
        self._steps = self._generated = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="nanoray-engine", daemon=True)
        self._thread.start()

    @property
    def decode_path(self) -> str:
        """The decode step that runs: "fused" (Triton kernels), "compiled" (torch.compile) or "eager"."""
        return "fused" if self._fused is not None else "compiled" if self.compile_decode else "eager"

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
        logprob} of the top_logprobs most likely}; entry 0 is None. Blocks until the engine thread ran it.
        Calls that wait together run as one batched forward."""
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
                           seed, min(params.max_tokens, self.seq_len - len(prompt)), asyncio.get_running_loop())
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
                    self._cond.wait_for(lambda: self._closed or self._waiting or self._jobs or self._active()
                                        or self._inflight)
                    if self._closed:
                        break
                    jobs, self._jobs = self._jobs, []
                    admitted = self._admit()
                if jobs:
                    self._score_jobs(jobs)
                in_flight = self._active() + ([r for r, _ in self._inflight.rows] if self._inflight else [])
                try:
                    for request in admitted:
                        self._prefill(request)
                    for request in self._active():
                        if request.cancelled:
                            self._release(request)
                    # Launch the next steps before reading the last ones: the host's work overlaps the GPU's.
                    done, self._inflight = self._inflight, self._launch()
                    if done:
                        self._collect(done)
                except Exception as e:  # fails the requests in flight (a finished one ignores it), not the engine
                    self._inflight = None
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
        """The prompt into the request's slot, its first token sampled and delivered, its slot's state set."""
        if request.cancelled:
            return self._release(request)
        view = self.cache.view(slice(request.slot, request.slot + 1), self.seq_len, 0)
        logits_1V = self.model(self._to_device([request.prompt]), cache=view)[:, -1]
        temperature, top_p, top_k = request.sampler
        k_max = min(self.vocab_size, _pow2(top_k) if top_k < self.vocab_size else self.vocab_size)
        adjusted = self._set_adjustments(request)
        token_1 = sample(logits_1V + self._bias[request.slot] if adjusted else logits_1V,
                         self._to_device([temperature], torch.float32), self._to_device([top_k]),
                         self._to_device([top_p], torch.float32), self._to_device([noise_key(request.seed, 0)]),
                         k_max)
        if adjusted:
            self._counts[request.slot, token_1] += 1
        lse_1 = logits_1V.logsumexp(dim=-1)
        row = torch.cat([token_1.float(), logits_1V.gather(1, token_1[:, None])[0] - lse_1])
        n = request.params.logprobs
        if n:
            values, ids = logits_1V[0].topk(n)
            row = torch.cat([row, ids.float(), values - lse_1])
        self._deliver(self._tokens(request, [row.tolist()], n))
        if not request.done:
            self._pending_rows[request.slot] = ([token_1.item(), len(request.prompt), 1, seed_key(request.seed),
                                                 top_k, 1], [temperature, top_p])

    def _set_adjustments(self, request: _Request) -> bool:
        """The request's logit bias and penalties into its slot's rows (cleared of an earlier occupant's);
        whether it has any."""
        slot, params = request.slot, request.params
        if slot in self._adjusted_slots:
            self._bias[slot].zero_()
            self._counts[slot].zero_()
            self._penalty[:, slot] = 0
            self._adjusted_slots.discard(slot)
        if not params.adjusted:
            return False
        if params.logit_bias:
            tokens, values = zip(*params.logit_bias)
            self._bias[slot].index_put_((self._to_device(list(tokens)),), self._to_device(list(values), torch.float32),
                                        accumulate=True)
        self._penalty[:, slot] = self._to_device([params.presence_penalty, params.frequency_penalty], torch.float32)
        self._adjusted_slots.add(slot)
        return True

    def _release(self, request: _Request) -> None:
        """Finished or gone: free its slot (the slot's device state goes back to idle at the next launch)."""
        request.done = True
        if request.slot >= 0 and self._slots[request.slot] is request:
            self._slots[request.slot] = None
            self._pending_rows[request.slot] = ([0, 0, 0, 0, 1, 0], [1.0, torch.inf])

    def _steps_for(self, B: int) -> int:
        """Decode steps per launch: one while few slots are busy (a token reaches its stream after one step);
        more as slots fill, where the host's per-token work (sync, deliveries) would otherwise bound the rate."""
        if self.steps_per_launch:
            return self.steps_per_launch
        return 1 if B <= 4 else 4 if B <= 32 else 8

    def _launch(self) -> _Launch | None:
        """Launch steps_for(B) decode steps over the smallest power-of-two prefix of slots holding every active
        one; their tokens are copied to pinned host memory as they finish."""
        active = self._active()
        if not active:
            return None
        B = min(self.max_batch, _pow2(max(r.slot for r in active) + 1))
        S = self._steps_for(B)
        k_max = min(self.vocab_size, _pow2(max(r.sampler[2] for r in active)))
        n_top = min(MAX_LOGPROBS, self.vocab_size) if any(r.params.logprobs for r in active) else 0
        length = None
        if self._fused is None:  # the model's decode forward attends over a power-of-two prefix of positions
            last = max(len(r.prompt) + r.launched + S for r in active)
            length = min(self.seq_len, max(MIN_ATTEND, _pow2(last)))
        adjusted = any(r.params.adjusted for r in active)  # a bias or a penalty: the PyTorch sampler step
        key = (B, S, k_max, n_top, length, adjusted)
        if key not in self._outputs:
            shape, pinned = (S, B, 2 + 2 * n_top), self.device.type == "cuda"
            self._outputs[key] = (torch.zeros(shape, device=self.device),
                                  [torch.zeros(shape, pin_memory=pinned) for _ in range(2)])
        out, hosts = self._outputs[key]
        self._write_rows()
        try:
            self._replay(key, lambda: self._decode_steps(B, S, k_max, n_top, length, adjusted, out))
        except Exception as e:
            if self._fused is None:
                raise
            _warn_fallback(f"the fused decode step failed ({e!r})")
            self._fused, self._graphs = None, {}
            return self._launch()
        host, event = hosts[self._parity], self._events[self._parity]
        self._parity ^= 1
        host.copy_(out, non_blocking=event is not None)
        if event is not None:
            event.record()
        for r in active:
            r.launched += S
        self._steps += S
        return _Launch(host, event, [(r, r.slot) for r in active], n_top)

    def _collect(self, launch: _Launch) -> None:
        """Deliver a finished launch's tokens to their requests, up to each one's stop token or max_new."""
        if launch.event is not None:
            launch.event.synchronize()
        data = launch.host.tolist()  # (S, B, W) nested lists
        deliveries = []
        for request, row in launch.rows:
            if not request.done:
                deliveries += self._tokens(request, [step[row] for step in data], launch.n_top)
        self._deliver(deliveries)

    def _tokens(self, request: _Request, rows: list[list[float]], n_top: int) -> list[tuple[_Request, list]]:
        """A request's items from its rows of sampled (token, logprob, top ids, top logprobs), one per step."""
        items, n = [], request.params.logprobs
        for row in rows:
            token = int(row[0])
            if token in request.stop_ids:
                items.append("stop")
                self._release(request)
                break
            top = dict(zip(map(int, row[2:2 + n]), row[2 + n_top:2 + n_top + n])) if n else {}
            items.append((token, row[1], top))
            request.generated += 1
            self._generated += 1
            if request.generated == request.max_new:
                items.append("length")
                self._release(request)
                break
        return [(request, items)] if items else []

    def _write_rows(self) -> None:
        """Admitted and freed slots' state onto the device (after the launches already queued)."""
        if not self._pending_rows:
            return
        slots = list(self._pending_rows)
        ints, floats = zip(*self._pending_rows.values())
        index = self._to_device(slots)
        self._state.index_copy_(1, index, self._to_device(list(zip(*ints))))
        self._fstate.index_copy_(1, index, self._to_device(list(zip(*floats)), torch.float32))
        self._pending_rows = {}

    def _decode_steps(self, B: int, S: int, k_max: int, n_top: int, length: int | None, adjusted: bool,
                      out: torch.Tensor) -> None:
        """S decode steps of the first B slots from their device state, each step's (token, logprob, top) into
        out[s]; touches only static buffers, the cache and the state (so a CUDA graph can replay it)."""
        for s in range(S):
            if self._fused is not None:
                logits_BV = self._fused.forward(B)
                if adjusted:  # the fused sampler kernel knows no bias or penalty: the PyTorch one does
                    lse_B = self._pick(logits_BV, B, k_max, out[s], adjusted)
                else:
                    self._fused.sample(B, k_max, out[s])
                    lse_B = self._fused.row_lse[:B]
            else:
                logits_BV = self._decode(B, length)
                lse_B = self._pick(logits_BV, B, k_max, out[s], adjusted)
            if n_top:
                values, ids = logits_BV.topk(n_top, dim=-1)
                out[s, :, 2:2 + n_top] = ids
                out[s, :, 2 + n_top:] = values - lse_B[:, None]

    def _decode(self, B: int, length: int) -> torch.Tensor:
        """Logits (B, V) of the first B slots' last tokens, through the model's decode forward."""
        args = (self.model, self.cache, self._state[0, :B], self._state[1, :B], length)
        if self.compile_decode:
            try:  # one graph per (B, length): the buckets bound them (log2 of each), for every engine in the process
                with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.accumulated_recompile_limit):
                    return self._compiled_decode(*args)
            except Exception as e:  # an op this torch cannot compile: stay correct, run eagerly from now on
                _warn_fallback(f"torch.compile of the decode step failed ({e!r})")
                self.compile_decode = False
        return decode_step(*args)

    def _pick(self, logits_BV: torch.Tensor, B: int, k_max: int, out_BW: torch.Tensor,
              adjusted: bool = False) -> torch.Tensor:
        """The PyTorch sampler step (what fused_decode's _pick kernel does): each row's token and its logprob
        into out_BW, the row's next inputs into the state. Returns the rows' log-sum-exps. `adjusted`: each row's
        logit bias and presence/frequency penalties change the logits it samples from (the logprobs reported
        stay the model's own), and the sampled tokens are counted for the penalties."""
        state, fstate = self._state[:, :B], self._fstate[:, :B]
        sampled_BV = logits_BV
        if adjusted:
            counts_BV = self._counts[:B]
            sampled_BV = (logits_BV + self._bias[:B] - self._penalty[1, :B, None] * counts_BV
                          - self._penalty[0, :B, None] * (counts_BV > 0))
        tokens_B = sample(sampled_BV, fstate[0], state[4], fstate[1], _hash32(state[3] ^ state[2]), k_max)
        if adjusted:  # idle rows (active 0) count nothing
            self._counts[:B].scatter_add_(1, tokens_B[:, None], state[5, :, None].to(self._counts.dtype))
        lse_B = logits_BV.logsumexp(dim=-1)
        out_BW[:, 0] = tokens_B
        out_BW[:, 1] = logits_BV.gather(1, tokens_B[:, None])[:, 0] - lse_B
        state[0] = tokens_B
        state[1] = (state[1] + state[5]).clamp(max=self.seq_len - 1)
        state[2] += state[5]
        return lse_B

    def _replay(self, key: tuple, step) -> None:
        """Run `step` (which touches only static buffers, the cache and the slot state), on a GPU as a CUDA
        graph captured on first use. The capture's warm-up run (kernel selection, Triton compiles) writes what
        the real run writes, except the state and smear inputs it advances, which are put back."""
        if not self.cuda_graphs:
            return step()
        if key not in self._graphs:
            advanced = (self._state, self._fstate, self.cache.prev_emb, self._counts)
            saved = [t.clone() for t in advanced]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    step()
            finally:
                torch.cuda.current_stream().wait_stream(side)
                for t, s in zip(advanced, saved):
                    t.copy_(s)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    step()
            except RuntimeError as e:  # an op this torch cannot capture: stay correct, run eagerly from now on
                _warn_fallback(f"CUDA graph capture failed ({e!r})")
                self.cuda_graphs = False
                return step()
            self._graphs[key] = graph
        self._graphs[key].replay()

    def _to_device(self, data: list, dtype=torch.long) -> torch.Tensor:
        """A small host list on the device, copied from pinned memory without stalling the host."""
        pinned = self.device.type == "cuda"
        return torch.tensor(data, dtype=dtype, pin_memory=pinned).to(self.device, non_blocking=pinned)

    def _finish(self, request: _Request, error: BaseException) -> None:
        self._release(request)
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

    # ------------------------------------------------------------------------------------ scoring

    def _score_jobs(self, jobs: list) -> None:
        """score() calls, batched: as many sequences per forward as SCORE_TOKENS (padded) allows."""
        batch, longest = [], 0
        for job in sorted(jobs, key=lambda j: len(j[1])):
            longest = max(longest, len(job[1]))
            if batch and longest * (len(batch) + 1) > SCORE_TOKENS:
                self._score_batch(batch)
                batch, longest = [], len(job[1])
            batch.append(job)
        self._score_batch(batch)

    def _score_batch(self, jobs: list) -> None:
        try:
            results = self._score([tokens for _, tokens, _ in jobs], max(top for _, _, top in jobs))
        except Exception as e:
            for future, _, _ in jobs:
                future.set_exception(e)
            return
        for (future, _, top), (chosen, tops) in zip(jobs, results):
            if tops is None:
                tops = [{}] * len(chosen)
            elif top < len(next(iter(tops), {})):
                tops = [dict(list(t.items())[:top]) for t in tops]
            future.set_result([None] + [{"logprob": lp, "top": t} for lp, t in zip(chosen, tops)])

    def _score(self, seqs: list[list[int]], top_logprobs: int) -> list[tuple[list[float], list[dict] | None]]:
        """Per sequence: the logprob of each token after the first, and (top_logprobs > 0) {token: logprob} of
        the top_logprobs most likely there. One forward over the padded sequences, with logits only where a
        next token is scored."""
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq)
        lengths = torch.tensor([len(seq) - 1 for seq in seqs])
        rows = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
        if not len(rows):
            return [([], None) for _ in seqs]
        cols = torch.cat([torch.arange(n) for n in lengths.tolist()])
        targets = ids[rows, cols + 1]
        logits_NV = self.model(ids.to(self.device), at=(rows.to(self.device), cols.to(self.device)))
        lse_N = logits_NV.logsumexp(dim=-1)
        chosen = (logits_NV.gather(1, targets.to(self.device)[:, None])[:, 0] - lse_N).tolist()
        tops = None
        if top_logprobs:
            top = logits_NV.topk(top_logprobs, dim=-1)
            tops = [dict(zip(i, v)) for i, v in zip(top.indices.tolist(), (top.values - lse_N[:, None]).tolist())]
        out, at = [], 0
        for n in lengths.tolist():
            out.append((chosen[at:at + n], None if tops is None else tops[at:at + n]))
            at += n
        return out


_STATE = {name: i for i, name in enumerate(("token", "pos", "step", "seed", "top_k", "active"))}


def _warn_fallback(what: str) -> None:
    """A fast path that does not run here: loud, since it costs several times the decode speed."""
    warnings.warn(f"nanoray.engine: {what}; decoding on a slower path (Engine.decode_path says which)",
                  RuntimeWarning, stacklevel=3)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()
