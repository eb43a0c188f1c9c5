"""The inference engine on CPU (a tiny random model, a tokenizer trained in a second), plus one GPU test."""

import asyncio
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from nanoray.engine import Engine, SamplingParams, decode_step, gumbel_noise, sample
from nanoray.model import KVCache, ModelConfig, build_model
from nanoray.tokenizer import TextStream, Tokenizer, render_chat

GREEDY = SamplingParams(max_tokens=12, temperature=0)
TEXT = ("The quick brown fox jumps over the lazy dog. Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂🚀. "
        "def main(): return sum(x * x for x in range(10))\n")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT * 20], vocab_size=320)


def tiny_model(tokenizer, seq_len=64, window_pattern="L", n_kv_head=2, seed=0):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=seq_len, n_layer=2, n_embd=64, n_head=2,
                         n_kv_head=n_kv_head, head_dim=32, window_pattern=window_pattern)
    model = build_model(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # perturb the zero-initialized projections so every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture
def engine(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4)
    yield engine
    engine.close()


def naive_greedy(model, prompt, n):
    """Full recompute, argmax each time: the reference for the cached, batched decode."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(min(n, model.config.seq_len - len(prompt))):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(n, seed=0, vocab=256):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (int(length),), generator=gen).tolist()
            for length in torch.randint(1, 30, (n,), generator=gen)]


async def staggered(engine, prompts, params, stop_ids=frozenset()):
    """Start request i after i short pauses, so requests join a batch that is already decoding."""
    async def one(i, prompt):
        await asyncio.sleep(0.003 * i)
        return await engine.generate(prompt, params, stop_ids=set(stop_ids))
    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


@pytest.mark.parametrize("window_pattern, n_kv_head", [("L", 2), ("SL", 1)])
def test_greedy_continuous_batching_equals_full_recompute(tokenizer, window_pattern, n_kv_head):
    model = tiny_model(tokenizer, window_pattern=window_pattern, n_kv_head=n_kv_head)  # SL: 16-token windows
    engine = Engine(model, tokenizer, max_batch=4)  # 7 requests: some wait for a free slot
    batch = prompts(7) + [list(range(60))]  # the last one fills the context
    try:
        results = asyncio.run(staggered(engine, batch, SamplingParams(max_tokens=20, temperature=0)))
        stats = engine.stats()
    finally:
        engine.close()
    for prompt, result in zip(batch, results):
        assert result.tokens == naive_greedy(model, prompt, 20)
        assert result.finish_reason == "length" and result.prompt_tokens == len(prompt)
    assert len(results[-1].tokens) == 4  # 60 + 4 = the 64-token context
    assert stats["generated_tokens"] == sum(len(r.tokens) for r in results)
    assert stats["steps"] < stats["generated_tokens"] - len(batch)  # steps were shared: it batched


def test_several_steps_per_launch_equal_one_and_the_full_recompute(tokenizer, model):
    """steps_per_launch 3: a launch's tokens past a stop token or max_tokens are dropped, the rest equal the full
    recompute, and seeded sampling draws what one step per launch draws (the noise step lives on the device)."""
    engine = Engine(model, tokenizer, max_batch=4, steps_per_launch=3)
    batch = prompts(5, seed=9)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=5)
    try:
        results = asyncio.run(staggered(engine, batch, SamplingParams(max_tokens=7, temperature=0)))
        reference = naive_greedy(model, batch[0], 7)
        stop = reference[4]
        stopped = asyncio.run(engine.generate(batch[0], SamplingParams(max_tokens=7, temperature=0), stop_ids={stop}))
        three = asyncio.run(engine.generate(batch[1], sampled, stop_ids=set())).tokens
        steps = engine.stats()["steps"]
    finally:
        engine.close()
    one_engine = Engine(model, tokenizer, max_batch=4, steps_per_launch=1)
    try:
        one = asyncio.run(one_engine.generate(batch[1], sampled, stop_ids=set())).tokens
    finally:
        one_engine.close()
    for prompt, result in zip(batch, results):
        assert result.tokens == naive_greedy(model, prompt, 7) and result.finish_reason == "length"
    assert stopped.finish_reason == "stop" and stopped.tokens == reference[:reference.index(stop)]
    assert three == one and len(three) == 10 and steps % 3 == 0


def test_seeded_sampling_is_deterministic_and_independent_of_concurrency(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    prompt = prompts(1, seed=1)[0]
    alone = asyncio.run(engine.generate(prompt, params, stop_ids=set())).tokens

    async def crowded():
        others = [engine.generate(p, SamplingParams(max_tokens=16, temperature=1.2), stop_ids=set())
                  for p in prompts(3, seed=2)]
        results = await asyncio.gather(*others, engine.generate(prompt, params, stop_ids=set()))
        return results[-1].tokens
    assert asyncio.run(crowded()) == alone
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=8)
    assert asyncio.run(engine.generate(prompt, other_seed, stop_ids=set())).tokens != alone


def test_sampling_noise_is_finite_so_masked_candidates_stay_out():
    """Key 3256051203 hashes rank 2488 to the top 24-bit value, whose fp32 uniform rounded to 1.0: noise +inf,
    and a candidate outside the top-k (-inf) + inf = NaN won the argmax. A greedy row of a batch whose k_max
    was the whole vocabulary then got a random token (the serve load test caught it, about 1 run in 5)."""
    key = torch.tensor([3256051203])
    assert torch.isfinite(gumbel_noise(key, 4096)).all()
    assert torch.isfinite(gumbel_noise(torch.randint(0, 2**32, (256,)), 4096)).all()
    logits = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0))
    one, inf = torch.ones(1), torch.tensor([torch.inf])
    assert sample(logits, one, torch.tensor([1]), inf, key, 4096).item() == logits.argmax().item()
    top3 = set(logits.topk(3).indices[0].tolist())
    draws = {sample(logits, one, torch.tensor([3]), inf, torch.tensor([k]), 4096).item() for k in range(64)}
    assert draws <= top3 and len(draws) > 1


def test_top_k_1_equals_greedy_and_stop_tokens(engine, model):
    prompt = prompts(1, seed=3)[0]
    greedy = asyncio.run(engine.generate(prompt, GREEDY, stop_ids=set()))
    top1 = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.5, top_k=1),
                                       stop_ids=set()))
    assert top1.tokens == greedy.tokens == naive_greedy(model, prompt, 12)
    stop = greedy.tokens[5]
    stopped = asyncio.run(engine.generate(prompt, GREEDY, stop_ids={stop}))
    assert stopped.finish_reason == "stop" and stopped.tokens == greedy.tokens[:greedy.tokens.index(stop)]
    assert engine.default_stop_ids == {engine.tokenizer.encode_special("<|assistant_end|>"), engine.tokenizer.bos_id}


def test_max_tokens_and_context_limits(engine):
    short = asyncio.run(engine.generate([1, 2, 3], SamplingParams(max_tokens=5, temperature=0), stop_ids=set()))
    assert len(short.tokens) == 5 and short.finish_reason == "length"
    assert short.text == engine.tokenizer.decode(short.tokens)
    last = asyncio.run(engine.generate(list(range(63)), SamplingParams(max_tokens=50), stop_ids=set()))
    assert len(last.tokens) == 1 and last.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt has 64 tokens; the context is 64"):
        asyncio.run(engine.generate(list(range(64)), GREEDY))


def test_closing_or_cancelling_a_stream_frees_its_slot(tokenizer):
    engine = Engine(tiny_model(tokenizer, seq_len=4096), tokenizer, max_batch=2)  # long enough not to finish

    async def wait_idle():
        deadline = time.monotonic() + 5
        while engine.stats()["active"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return engine.stats()

    async def main():
        stream = engine.stream([1, 2, 3], SamplingParams(max_tokens=4000), stop_ids=set())
        await anext(stream)
        await anext(stream)
        assert engine.stats()["active"] == 1
        await stream.aclose()
        assert (await wait_idle())["active"] == 0

        async def consume():
            async for _ in engine.stream([4, 5], SamplingParams(max_tokens=4000), stop_ids=set()):
                pass
        task = asyncio.create_task(consume())
        while engine.stats()["generated_tokens"] < 10:
            await asyncio.sleep(0.005)
        task.cancel()
        stats = await wait_idle()
        assert stats["active"] == 0 and stats["queued"] == 0 and stats["generated_tokens"] < 4000
    try:
        asyncio.run(main())
    finally:
        engine.close()
    assert set(engine.stats()) == {"active", "queued", "steps", "generated_tokens", "max_batch"}


def test_render_chat_format(tokenizer):
    s, enc = tokenizer.encode_special, tokenizer.encode
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    assert render_chat(tokenizer, messages) == [
        tokenizer.bos_id, s("<|user_start|>"), *enc("Be brief.\n\nHi"), s("<|user_end|>"),
        s("<|assistant_start|>"), *enc("Hello!"), s("<|assistant_end|>"),
        s("<|user_start|>"), *enc("2+2?"), s("<|user_end|>"), s("<|assistant_start|>")]
    with pytest.raises(ValueError, match=r"messages\[1\].role"):
        render_chat(tokenizer, [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[1\].role"):
        render_chat(tokenizer, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_text_stream_holds_back_partial_utf8(tokenizer):
    text = "naïve 日本語 🙂🚀 ok"
    stream = TextStream(tokenizer)
    pieces = [stream.feed(t) for t in tokenizer.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text and "" in pieces[:-1]  # some token ended mid-character
    assert not any("\ufffd" in p for p in pieces)


def test_score_and_stream_logprobs_match_a_full_forward(engine, model):
    tokens = prompts(1, seed=4)[0][:20]
    scores = engine.score(tokens, top_logprobs=3)
    expected = torch.log_softmax(model(torch.tensor([tokens]))[0], dim=-1)
    assert scores[0] is None and len(scores) == len(tokens)
    for i in range(1, len(tokens)):
        assert scores[i]["logprob"] == pytest.approx(expected[i - 1, tokens[i]].item(), abs=1e-4)
        assert list(scores[i]["top"]) == expected[i - 1].topk(3).indices.tolist()

    async def streamed():
        return [item async for item in engine.stream_with_logprobs(
            tokens, SamplingParams(max_tokens=6, temperature=0, logprobs=2), stop_ids=set())]
    items = asyncio.run(streamed())
    rescored = engine.score(tokens + [t for t, _, _ in items])[len(tokens):]
    for (token, logprob, top), again in zip(items, rescored):
        assert logprob == pytest.approx(again["logprob"], abs=1e-4) and len(top) == 2
        assert token == next(iter(top)) and top[token] == pytest.approx(logprob)
    with pytest.raises(ValueError, match="tokens has 65 tokens"):
        engine.score(list(range(65)))


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", 2.5), ("temperature", -1),
                                          ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("logprobs", 21),
                                          ("logit_bias", ((3, 101.0),)), ("logit_bias", ((-1, 1.0),)),
                                          ("presence_penalty", 2.5), ("frequency_penalty", -2.1)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def naive_adjusted_greedy(model, prompt, n, logit_bias=(), presence_penalty=0.0, frequency_penalty=0.0):
    """Full recompute, argmax of the logits plus the bias, minus OpenAI's penalties on the tokens so far."""
    ids, counts = list(prompt), {}
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].clone()
            for token, bias in logit_bias:
                logits[token] += bias
            for token, count in counts.items():
                logits[token] -= frequency_penalty * count + presence_penalty
            ids.append(int(logits.argmax()))
            counts[ids[-1]] = counts.get(ids[-1], 0) + 1
    return ids[len(prompt):]


def test_logit_bias_and_repetition_penalties_equal_a_naive_reference(engine, model):
    """Issue 17, finding 4: logit_bias, presence_penalty and frequency_penalty were accepted and ignored. Each
    request's adjustments apply to its own row only: plain requests in the same batches stay plain greedy."""
    batch = prompts(4, seed=9)
    greedy = [naive_greedy(model, p, 12) for p in batch]
    cases = [dict(logit_bias=((greedy[0][0], -100.0),)),  # the greedy first token, banned
             dict(logit_bias=((7, 100.0), (8, -5.0))),  # token 7 forced
             dict(presence_penalty=1.5),
             dict(frequency_penalty=0.7, presence_penalty=-0.3, logit_bias=((greedy[3][1], 2.0),))]

    async def run():
        adjusted = [engine.generate(p, SamplingParams(max_tokens=12, temperature=0, **kw), stop_ids=set())
                    for p, kw in zip(batch, cases)]
        plain = [engine.generate(p, GREEDY, stop_ids=set()) for p in batch]
        return await asyncio.gather(*adjusted, *plain)
    results = asyncio.run(run())
    for prompt, kw, result in zip(batch, cases, results):
        assert result.tokens == naive_adjusted_greedy(model, prompt, 12, **kw)
    assert results[1].tokens == [7] * 12 and results[0].tokens[0] != greedy[0][0]
    assert sum(r.tokens != g for r, g in zip(results[:4], greedy)) >= 3  # the adjustments changed the text
    assert [r.tokens for r in results[4:]] == greedy
    with pytest.raises(ValueError, match="logit_bias: token ids must be in"):
        asyncio.run(engine.generate([1, 2], SamplingParams(logit_bias=((10**6, 1.0),))))


def test_seeds_use_all_their_bits(engine):
    """Issue 17, finding 4: seeds were cut to 32 bits (seed s and s + 2**32 drew the same text)."""
    prompt = prompts(1, seed=1)[0]

    def draw(seed):
        params = SamplingParams(max_tokens=16, temperature=1.0, top_k=0, seed=seed)
        return asyncio.run(engine.generate(prompt, params, stop_ids=set())).tokens
    assert draw(7 + 2**32) == draw(7 + 2**32) != draw(7)
    assert draw(2**63 - 1) != draw(2**31 - 1)


def test_serve_throughput_benchmark_smoke():
    out = subprocess.run([sys.executable, "benchmarks/serve_throughput.py", "--depth", "2", "--preset", "tiny",
                          "--quick"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"depth", "ttft_ms", "decode_tok_s_b1", "tok_s_b8", "tok_s_b32", "tok_s_b128", "mbu_b1",
            "weight_bytes", "kernels_per_step", "gpu", "torch"} <= result.keys()
    assert result["depth"] == 2 and result["decode_tok_s_b1"] > 0 and result["tok_s_b8"] > 0
    assert result["kernels_per_step"] > 0  # the profiled step ran (its call follows the engine's signature)


@pytest.mark.parametrize("option, value", [("--gemv-picks", '{"1280x1280": [4, 2048]}'), ("--gemv-picks", "4,2048"),
                                           ("--attention-tiles", "64,3")])
def test_serve_throughput_names_a_malformed_option(option, value):
    """Kernel options that decode_kernels.py prints for serve_throughput.py: a malformed one stops before any
    model is built, naming the option and its form."""
    out = subprocess.run([sys.executable, "benchmarks/serve_throughput.py", "--depth", "2", "--preset", "tiny",
                          option, value], capture_output=True, text=True)
    assert out.returncode == 2 and f"{option}: " in out.stderr and value in out.stderr


needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
                               reason="torch.compile on CPU needs a C++ compiler")


@needs_cxx
def test_compiled_decode_step_equals_eager(tokenizer):
    """The engine's compiled decode step (static shapes, whole cache tensors mutated in place) against the eager
    one: three slots at different positions (one past the 128-token short window) and an idle fourth row."""
    model = tiny_model(tokenizer, seq_len=512, window_pattern="SL", n_kv_head=1)
    caches = [KVCache(model.config, 4, 512, "cpu", torch.float32) for _ in range(2)]
    batch = [prompts(1, seed=6)[0] * 8, [5, 6, 7], prompts(1, seed=7)[0]]
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for cache in caches:
            last = [int(model(torch.tensor([prompt]), cache=cache.view(slice(slot, slot + 1), 512, 0))[0, -1].argmax())
                    for slot, prompt in enumerate(batch)]
        idx, pos = torch.tensor(last + [0]), torch.tensor([len(prompt) for prompt in batch] + [0])
        assert 128 < pos[0] < 250
        for _ in range(6):
            eager_BV = decode_step(model, caches[0], idx, pos, 256)
            compiled_BV = compiled(model, caches[1], idx, pos, 256)
            torch.testing.assert_close(compiled_BV, eager_BV, atol=1e-4, rtol=1e-4)
            assert compiled_BV.argmax(dim=-1).tolist() == eager_BV.argmax(dim=-1).tolist()
            idx, pos = eager_BV.argmax(dim=-1), pos + torch.tensor([1, 1, 1, 0])
    for name in ("k", "v", "prev_emb"):  # the compiled step wrote the cache itself, like the eager one
        torch.testing.assert_close(getattr(caches[1], name), getattr(caches[0], name), atol=1e-4, rtol=1e-4)


@needs_cxx
def test_engine_with_compiled_decode_equals_full_recompute(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, compile_decode=True)  # two compiled shapes: 1 and 2 slots
    batch = prompts(3, seed=8)
    try:
        results = asyncio.run(staggered(engine, batch, SamplingParams(max_tokens=8, temperature=0)))
    finally:
        engine.close()
    assert engine.compile_decode  # it did not fall back to eager
    assert [r.tokens for r in results] == [naive_greedy(model, prompt, 8) for prompt in batch]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_eager(tokenizer):
    model = tiny_model(tokenizer, seq_len=256).cuda()
    batch = prompts(6, seed=5)
    results = {}
    for graphs in (True, False):
        engine = Engine(model, tokenizer, max_batch=4, cuda_graphs=graphs)
        try:
            for params in (GREEDY, SamplingParams(max_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=3)):
                results[graphs, params] = [r.tokens for r in asyncio.run(staggered(engine, batch, params))]
        finally:
            engine.close()
    assert all(results[True, params] == results[False, params] for _, params in results)
