"""The jobs' command line (jobs/_cli.py): flags, machine defaults, and errors in the words of the flags."""

import argparse

import pytest

from jobs._cli import FLAGS, add_arguments, flag_message, numbers, plan_table
from nanoray.dial import defaults
from nanoray.sweep import RESUME_FIELDS, ResumeMismatch, SweepConfig, trials


def test_a_resume_mismatch_names_the_flag():
    e = ResumeMismatch("ratio", "sweep 'fam' in /s was started with ratio = 0.25, not 0.5; a re-run resumes it as "
                                "it was started: give the same settings, or another sweep name")
    assert flag_message(e) == ("--ratio: sweep 'fam' in /s was started with ratio = 0.25, not 0.5; a re-run resumes "
                               "it as it was started: give the same settings, or a new --name")
    assert flag_message(ResumeMismatch("data.source", "x")).startswith("--source: ")
    # every field a resume can refuse has its flag, but eval_tokens, which no flag sets (the machine's default)
    assert set(RESUME_FIELDS) - set(FLAGS) == {"eval_tokens"}


def test_flag_defaults_come_from_the_machine_defaults():
    p = argparse.ArgumentParser()
    add_arguments(p, grid="ratio")
    args = p.parse_args([])
    assert args.depths is None and args.ratio is None and args.preset is None  # filled in per machine, later
    assert defaults(True).preset == "gpt2" and defaults(False).preset == "tiny"
    assert defaults(False).depths == [1, 2, 3] and defaults(False).ratio == 1.0
    helps = {a.dest: a.help for a in p._actions}
    assert "1,2,3 on CPU" in helps["depths"] and "6,8,10,12 on GPUs" in helps["depths"]


def test_numbers_name_the_flag():
    assert numbers("--depths", "1, 2,3", int) == [1, 2, 3] and numbers("--depths", None, int) is None
    for bad in ("", "1,x", ","):
        with pytest.raises(ValueError, match="^--depths: comma-separated numbers"):
            numbers("--depths", bad, int)


def test_plan_table_lists_every_trial_and_the_total():
    table = plan_table(trials(SweepConfig(depths=[1, 2], ratio=1.0))).splitlines()
    assert table[0].split()[:3] == ["trial", "params", "tokens"]
    assert [line.split()[0] for line in table[1:-1]] == ["d1", "d2", "total"]
    assert table[-1].startswith("matmuls bf16, windows L, rows per micro-step sized for no memory limit")
    fp8 = plan_table(trials(SweepConfig(depths=[8], preset="gpt2", fp8=True, window_pattern="SSSL",
                                        gpu_memory_gib=139.8))).splitlines()
    assert fp8[1].split()[6:8] == ["128", "50.9"]  # d8: its whole 2^18-token batch in one micro-step
    assert fp8[-1].startswith("matmuls fp8 (block matrices) + bf16, windows SSSL, rows per micro-step sized for "
                              "139.8 GiB GPUs")
