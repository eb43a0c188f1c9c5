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


def test_quality_compares_configurations_on_identical_batches(tmp_path):
    """benchmarks/quality.py on CPU: the same configuration twice gives the same val loss to the last digit (the
    same init, rows and val rows); another window pattern prints its ratio and its FLOPs ratio."""
    out = subprocess.run([sys.executable, "benchmarks/quality.py", "--preset", "tiny", "--depth", "2", "--steps", "6",
                          "--total-batch-tokens", "2048", "--configs", "bf16:L,bf16:L,bf16:SL", "--eval-tokens", "4096",
                          "--log-every", "2", "--seed", "7", "--data-dir", str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    base, same, windows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert base["config"] == "bf16:L" and "val_loss_ratio" not in base and base["steps"] == 6 and base["seed"] == 7
    assert same["val_loss"] == base["val_loss"] and same["val_loss_ratio"] == 1.0
    assert windows["config"] == "bf16:SL" and windows["flops_ratio"] < 1
    assert windows["val_loss_ratio"] == round(windows["val_loss"] / base["val_loss"], 5)
    other = subprocess.run([sys.executable, "benchmarks/quality.py", "--preset", "tiny", "--depth", "2", "--steps", "6",
                            "--total-batch-tokens", "2048", "--configs", "bf16:L,bf16:SL", "--eval-tokens", "4096",
                            "--log-every", "2", "--data-dir", str(tmp_path / "data")],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    default_seed = json.loads(next(line for line in other.stdout.splitlines() if line.startswith("{")))
    assert default_seed["seed"] == 42 and default_seed["val_loss"] != base["val_loss"]  # --seed reaches the init
    bad = subprocess.run([sys.executable, "benchmarks/quality.py", "--depth", "2", "--configs", "fp16:L,bf16:L"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--configs: <precision>:<windows>" in bad.stderr
    no_fp8 = subprocess.run([sys.executable, "benchmarks/quality.py", "--depth", "2", "--configs", "bf16:L,fp8:L"],
                            capture_output=True, text=True)
    assert no_fp8.returncode == 2 and "--configs: fp8 configurations need a GPU" in no_fp8.stderr
