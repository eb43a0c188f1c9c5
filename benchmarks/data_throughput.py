"""How fast the Ray Data stream delivers packed rows, on N CPUs.

    python benchmarks/data_throughput.py --source stdlib --cpus 8 [--preset gpt2] [--seconds 30]

Starts a local Ray with N logical CPUs and N tokenizer actors (one CPU each, tiktoken on one thread),
prepares the source (shards + a tokenizer of the preset's vocabulary, reused when present), then pulls
batches of rows through a streaming split, as a Train worker would, for --seconds after the first
batch. Last line: one JSON object with tokens_per_s, mb_per_s (UTF-8 text bytes the tokens stand for),
rows_per_s, cpus, peak_rss_mb (driver + every Ray process, sampled every 0.2 s).
"""

import argparse
import json
import os
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def peak_rss_sampler(stop: threading.Event, peak: list[float]) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total / 2**20)
        stop.wait(0.2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="stdlib")
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs for Ray = tokenizer actors")
    p.add_argument("--preset", default="gpt2", help="vocabulary and row length")
    p.add_argument("--seconds", type=float, default=30.0, help="measure this long after the first batch")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch pulled")
    p.add_argument("--data-dir", default=None, help="prepared shards and tokenizer (default runs/data/<source>)")
    args = p.parse_args()

    import numpy as np
    import ray

    from nanoray.dial import get_preset
    from nanoray.storage import RunStore
    from nanoray.stream import StreamSpec, build_dataset, prepare_data
    from nanoray.tokenizer import Tokenizer

    preset = get_preset(args.preset)
    t0 = time.perf_counter()
    spec, tokenizer_dir = prepare_data(args.source, preset.vocab_size, args.data_dir or RunStore("runs").data_dir(args.source))
    prepare_s = time.perf_counter() - t0
    tokenizer = Tokenizer.load(tokenizer_dir)
    token_bytes = tokenizer.token_bytes().numpy().astype(np.int64)

    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=peak_rss_sampler, args=(stop, peak), daemon=True)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sampler.start()
    stream = StreamSpec(source=spec, seq_len=preset.seq_len, epochs=1000, split_long_docs=preset.split_long_docs,
                        actors=args.cpus, cpus_per_actor=1.0)
    shard = build_dataset(stream, tokenizer).streaming_split(1, equal=True)[0]
    rows = tokens = text_bytes = 0
    start = None
    for batch in shard.iter_batches(batch_size=args.batch_size, batch_format="numpy", drop_last=True,
                                    prefetch_batches=4):
        if start is None:  # the clock starts at the first batch: actor start-up is not throughput
            start = time.perf_counter()
            continue
        rows += len(batch["tokens"])
        tokens += batch["tokens"].size
        text_bytes += int(token_bytes[batch["tokens"]].sum())
        if time.perf_counter() - start >= args.seconds:
            break
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    ray.shutdown()
    print(json.dumps(dict(source=args.source, preset=args.preset, cpus=args.cpus, tokens_per_s=round(tokens / elapsed),
                          mb_per_s=round(text_bytes / elapsed / 1e6, 2), rows_per_s=round(rows / elapsed, 1),
                          peak_rss_mb=round(peak[0]), measured_s=round(elapsed, 1), prepare_s=round(prepare_s, 1),
                          cpu_count=os.cpu_count())), flush=True)


if __name__ == "__main__":
    main()
