"""A family's fits from its rows (nanoray/family.py); the whole path, sweep to report, is in test_sweep.py."""

import re

import pytest

from nanoray.family import family_fits
from nanoray.sweep import SweepConfig


def test_isoflop_fits_from_rows():
    sweep = SweepConfig(depths=[1, 2, 3, 4], grid="isoflop", budgets=[1e12, 1e13, 1e14])
    rows = []
    for c in sweep.budgets:  # a loss surface whose optimum moves with C: E + A/N^0.34 + B/D^0.28, D = C/(6N)
        for n in (1e5, 3e5, 1e6, 3e6, 1e7):
            d = c / (6 * n)
            rows.append(dict(flops_budget=c, params=n, tokens=d, flops=c, status="done",
                             val_bpb=1.7 + 400 / n**0.34 + 410 / d**0.28))
    fit, notes = family_fits(sweep, rows)
    assert fit is None and len(notes) == 4 and notes[0].startswith("C = 1.00e+12: N_opt")
    exponent = float(re.search(r"N_opt = [0-9.]+ \* C\^([0-9.]+)", notes[-1]).group(1))
    assert exponent == pytest.approx(0.28 / (0.34 + 0.28), abs=0.03)  # N_opt ~ C^(beta / (alpha + beta))


def test_placement_names_every_machine_a_trial_ran_on():
    from nanoray.family import placement

    history = [dict(worker_host="a", worker_node_id="1"), dict(worker_host="a"), dict(worker_host="b")]
    final = dict(worker_host="b", worker_node_id="2", hostname="head")  # Tune's own `hostname`: the driver's
    assert placement(final, history) == dict(node_id="2", hostname="b", hostnames="a;b")
    assert placement({}, []) == {}  # reports without placement (older runs): no columns


def test_a_trials_wall_time_is_never_less_than_its_training():
    from nanoray.family import trial_wall

    assert trial_wall(dict(time_total_s=61.6, wall_time_s=75.0, train_time_s=70.6)) == 75.0  # a restored trial
    assert trial_wall(dict(time_total_s=80.0, wall_time_s=75.0)) == 80.0
    assert trial_wall(dict(time_total_s=12.0)) == 12.0 and trial_wall({}) != trial_wall({})  # NaN
