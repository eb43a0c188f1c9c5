"""Corpus sources: where documents (plain text) come from, before tokenization.

`read_source(spec, split)` yields the documents of one split. Every source splits the same way: a
document goes to `val` when the CRC32 of its key (file path + chunk number, or topic name) falls in
the first VAL_PERCENT of the range, so the split is deterministic, disjoint and stable as a corpus grows.

Sources (more come with the Ray Data pipeline):
    stdlib            CPython's own library sources and pydoc_data topics: every Python has them (~30 MB)
    files:<glob>      text files from disk, chunked into documents at blank lines
    parquet:<dir|glob>  parquet shards with a `text` column (one document per row); a directory with
                      train/ and val/ inside (as write_shards makes) keeps that split

`write_shards` turns any source into parquet shards (`text` column, zstd, row groups of 1024 docs):

    python -m nanoray.corpus --source stdlib --out runs/data/stdlib     # -> train/*.parquet, val/*.parquet
"""

import argparse
import glob
import json
import os
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

VAL_PERCENT = 2
CHUNK_CHARS = 8_000  # files are cut into documents of about this size, at blank lines
SOURCES = ("stdlib", "files:<glob>", "parquet:<dir|glob>")
ROW_GROUP_DOCS = 1024
SPLITS = ("train", "val")


def split_of(key: str) -> str:
    return "val" if zlib.crc32(key.encode()) % 100 < VAL_PERCENT else "train"


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text into pieces of about `size` characters at blank lines (a longer paragraph stays whole)."""
    chunks, current, length = [], [], 0
    for block in text.split("\n\n"):
        if current and length + len(block) > size:
            chunks.append("\n\n".join(current))
            current, length = [], 0
        current.append(block)
        length += len(block) + 2
    if current:
        chunks.append("\n\n".join(current))
    return [c for c in chunks if c.strip()]


def _read_files(paths: list[str], split: str, skipped: list | None = None) -> Iterator[str]:
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError) as e:
            if skipped is not None:
                skipped.append((path, f"{type(e).__name__}: {e}"))
            continue
        for i, chunk in enumerate(chunk_text(text)):
            if split_of(f"{path}#{i}") == split:
                yield chunk


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    return sorted(p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                  if f"{os.sep}site-packages{os.sep}" not in p and f"{os.sep}dist-packages{os.sep}" not in p)


def _stdlib(split: str, skipped: list | None) -> Iterator[str]:
    import pydoc_data.topics

    for name, text in sorted(pydoc_data.topics.topics.items()):
        if split_of(f"pydoc_data:{name}") == split:
            yield text
    yield from _read_files(stdlib_files(), split, skipped)


def read_source(spec: str, split: str = "train", skipped: list | None = None) -> Iterator[str]:
    """Documents of `split` from the source `spec` (checked now, read lazily). Unreadable files are
    skipped and, with their reason, appended to `skipped`."""
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    if spec == "stdlib":
        return _stdlib(split, skipped)
    if spec.startswith("files:"):
        pattern = spec.removeprefix("files:")
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"source {spec!r}: no files match {pattern!r}")
        return _read_files(paths, split, skipped)
    if spec.startswith("parquet:"):
        location = spec.removeprefix("parquet:")
        if os.path.isdir(os.path.join(location, split)):  # written by write_shards: the split is on disk
            return _read_parquet(parquet_paths(os.path.join(location, split)), None, skipped)
        return _read_parquet(parquet_paths(location), split, skipped)
    raise ValueError(f"source: unknown source {spec!r}; allowed: {', '.join(SOURCES)}")


def parquet_paths(location: str) -> list[str]:
    """Shards under a directory (recursively) or matching a glob, sorted."""
    pattern = os.path.join(location, "**", "*.parquet") if os.path.isdir(location) else location
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"parquet source {location!r}: no .parquet files there")
    return paths


def _read_parquet(paths: list[str], split: str | None, skipped: list | None) -> Iterator[str]:
    """Rows of the `text` column (of `split`, or all when None), one row group at a time. A corrupt
    shard or one without a `text` column raises, naming the file; empty documents are skipped."""
    for path in paths:
        try:
            shard = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from e
        if "text" not in shard.schema_arrow.names:
            raise ValueError(f"{path}: no 'text' column (columns: {', '.join(shard.schema_arrow.names)})")
        row = 0
        for group in range(shard.num_row_groups):
            for text in shard.read_row_group(group, columns=["text"]).column("text").to_pylist():
                key, row = f"{os.path.basename(path)}#{row}", row + 1
                if not text or not text.strip():
                    if skipped is not None:
                        skipped.append((key, "empty document"))
                    continue
                if split is None or split_of(key) == split:
                    yield text


def write_shards(docs: Iterable[str], out_dir: str | os.PathLike, docs_per_shard: int = 8 * ROW_GROUP_DOCS) -> list[Path]:
    """Write documents as parquet shards shard_00000.parquet, ... (each written to a temp name, then renamed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, batch = [], []

    def flush():
        path = out_dir / f"shard_{len(written):05d}.parquet"
        tmp = out_dir / f".{path.name}.tmp"
        pq.write_table(pa.table({"text": batch}), tmp, row_group_size=ROW_GROUP_DOCS, compression="zstd")
        os.replace(tmp, path)
        written.append(path)

    for doc in docs:
        batch.append(doc)
        if len(batch) == docs_per_shard:
            flush()
            batch = []
    if batch:
        flush()
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanoray.corpus", description="Write a corpus source as parquet shards.")
    p.add_argument("--source", default="stdlib", help=f"one of {', '.join(SOURCES)}")
    p.add_argument("--out", required=True, help="output directory (gets train/ and val/)")
    p.add_argument("--docs-per-shard", type=int, default=8 * ROW_GROUP_DOCS)
    args = p.parse_args(argv)
    summary = {}
    for split in SPLITS:
        skipped: list = []
        try:
            shards = write_shards(read_source(args.source, split, skipped), Path(args.out) / split, args.docs_per_shard)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
        summary[split] = dict(shards=len(shards), skipped=len(skipped))
        for what, why in skipped[:10]:
            print(f"skipped {what}: {why}")
    print(json.dumps(dict(out=args.out, **summary)))


if __name__ == "__main__":
    main()

