import json
import subprocess
import sys


def test_train_throughput_bare_smoke():
    """The benchmark script runs end to end (tiny preset on CPU) and ends with its JSON line."""
    out = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--depth", "2", "--preset", "tiny",
                          "--steps", "4", "--log-every", "2", "--bare"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"depth", "tok_per_s", "mfu", "step_s", "peak_mem_gb", "gpu", "torch"} <= result.keys()
    assert result["depth"] == 2 and result["tok_per_s"] > 0 and result["measured_steps"] == 2


def test_train_throughput_two_workers_smoke():
    """Through Ray Train with two DDP (gloo) workers on CPU: tok/s of both, per worker, and the scaling
    efficiency against a given 1-worker figure (the multi-GPU benchmark's path)."""
    out = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--depth", "2", "--preset", "tiny",
                          "--steps", "4", "--log-every", "2", "--workers", "2", "--baseline-tok-per-s", "1000"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["workers"] == 2 and result["mode"] == "ray-train" and result["measured_steps"] == 2
    assert result["tok_per_s_per_gpu"] == round(result["tok_per_s"] / 2)
    assert result["scaling_efficiency"] == round(result["tok_per_s"] / 2 / 1000, 4)
