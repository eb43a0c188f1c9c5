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
