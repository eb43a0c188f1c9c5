"""What a new user reads first (issue 17, finding 11): the CPU install route comes before the commands."""

from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_cpu_install_route_comes_before_the_first_install():
    cpu = README.find("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    first = README.find("pip install -e")
    assert 0 <= cpu < first, "the CPU build of PyTorch must be offered before the first `pip install -e`"
    assert "torch==2.13.0" not in README  # a version that is a CPU build only on our own machines
