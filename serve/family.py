"""The checkpoints to serve: one per depth, from a run directory's results.csv or an explicit list.

A run directory (what jobs/miniseries.py writes, runs/<name>/) has results.csv with one row per trial,
including `depth`, `checkpoint` (a directory with meta.json, model.safetensors and tokenizer/), `status`
and `val_bpb`. Where a depth has several trials (an isoFLOP grid), the one with the lowest val bpb is served.

Each checkpoint is checked as the engine would load it (without loading the weights): one that cannot be
served (a truncated model.safetensors, say) is set aside with its reason, and the others are served.
"""

import csv
import io
import math
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from nanoray.checkpoint import check_for_inference
from nanoray.storage import join, read_bytes


class Member(BaseModel):
    """One served depth: what the routes need to know without loading the model."""

    model_config = ConfigDict(frozen=True)
    depth: int = Field(description="the dial's depth (layers)")
    checkpoint: str = Field(description="the checkpoint directory: an absolute path, or a URI (s3://...)")
    seq_len: int = Field(description="context length in tokens")
    vocab_size: int = Field(description="tokens in the vocabulary, special tokens included")
    params: int = Field(description="total parameters")


class Unservable(BaseModel):
    """A checkpoint that was to be served but cannot be, and why."""

    model_config = ConfigDict(frozen=True)
    checkpoint: str = Field(description="absolute path of the checkpoint directory")
    depth: int | None = Field(description="its depth, where results.csv says (None: from a checkpoint list)")
    reason: str = Field(description="what is wrong with it")


class Family(BaseModel):
    """What find_family found: the members to serve, sorted by depth, and the checkpoints set aside."""

    model_config = ConfigDict(frozen=True)
    members: list[Member] = Field(description="the servable checkpoints, one per depth, sorted by depth")
    unservable: list[Unservable] = Field([], description="the checkpoints that cannot be served, with why")


def location(checkpoint: str | os.PathLike) -> str:
    """A checkpoint's location as the replicas open it: a URI as it is (s3://...: each replica downloads it),
    a local path made absolute."""
    return str(checkpoint) if "://" in str(checkpoint) else str(Path(checkpoint).resolve())


def member(checkpoint: str | os.PathLike) -> Member:
    """A checkpoint's depth and shape, from its meta.json, once checked as the engine would load it; raises
    ValueError or FileNotFoundError naming what is wrong."""
    path = location(checkpoint)
    meta = check_for_inference(path)
    model, plan = meta["model"], meta.get("plan") or {}
    depth = plan.get("depth", model["n_layer"])
    return Member(depth=depth, checkpoint=str(path), seq_len=model["seq_len"], vocab_size=model["vocab_size"],
                  params=plan.get("total_params", 0))


def _bpb(row: dict) -> float:
    try:
        value = float(row.get("val_bpb") or "nan")
    except ValueError:
        value = math.nan
    return math.inf if math.isnan(value) else value


def from_run_dir(run_dir: str | os.PathLike) -> dict[int, str]:
    """Per depth, the checkpoint of the finished trial (status "done") with the lowest val bpb (results.csv).
    The run directory may be a URI (s3://...: where the jobs put the report beside an object-store root); a
    relative checkpoint path is taken from the run directory."""
    table = join(str(run_dir), "results.csv")
    try:
        text = read_bytes(table).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"run_dir: {table} does not exist; point at a run directory "
                                f"(runs/<name>/ as jobs/miniseries.py writes it)") from None
    best: dict[int, dict] = {}
    for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=1):  # row 1: the first after the header
        if not row.get("checkpoint") or row.get("status", "done") != "done":
            continue
        try:
            depth = float(row.get("depth") or "nan")
            if not depth.is_integer() or depth < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"run_dir: {table} row {number}: depth must be a positive whole number, "
                             f"got {row.get('depth')!r}") from None
        depth = int(depth)
        if depth not in best or _bpb(row) < _bpb(best[depth]):
            best[depth] = row
    if not best:
        raise ValueError(f"run_dir: {table} has no finished trial (status done) with a checkpoint")
    return {d: best[d]["checkpoint"] if "://" in best[d]["checkpoint"] else join(str(run_dir), best[d]["checkpoint"])
            for d in sorted(best)}


def find_family(run_dir: str | os.PathLike | None = None, checkpoints: list[str] | None = None) -> Family:
    """The members to serve, from run_dir's results.csv or the checkpoints given, and the checkpoints that
    cannot be served. Raises ValueError or FileNotFoundError naming the argument where it is wrong, or
    where none of its checkpoints can be served."""
    if (run_dir is None) == (not checkpoints):
        raise ValueError("run_dir, checkpoints: give exactly one of them")
    field = "run_dir" if run_dir is not None else "checkpoints"
    members, unservable = [], []
    for depth, checkpoint in (from_run_dir(run_dir).items() if run_dir is not None
                              else ((None, c) for c in checkpoints)):
        try:
            members.append(member(checkpoint))
        except Exception as e:  # whatever keeps one checkpoint from loading: set it aside, serve the others
            unservable.append(Unservable(checkpoint=location(checkpoint), depth=depth,
                                         reason=f"{type(e).__name__}: {e}"))
    if not members:
        raise ValueError(f"{field}: no checkpoint can be served: "
                         + "; ".join(f"{u.checkpoint}: {u.reason}" for u in unservable))
    depths = [m.depth for m in members]
    if len(set(depths)) != len(depths):
        raise ValueError(f"checkpoints: one per depth, got depths {depths}")
    return Family(members=sorted(members, key=lambda m: m.depth), unservable=unservable)
