"""Corpus sources: where documents (plain text) come from, before tokenization.

`read_source(spec, split)` yields the documents of one split. Every source splits the same way: a
document goes to `val` when the CRC32 of its key (file path + chunk number, or topic name) falls in
the first VAL_PERCENT of the range, so the split is deterministic, disjoint and stable as a corpus grows.

Sources (more come with the Ray Data pipeline):
    stdlib          CPython's own library sources and pydoc_data topics: every Python has them (~30 MB)
    files:<glob>    text files from disk, chunked into documents at blank lines
"""

import glob
import os
import sysconfig
import zlib
from collections.abc import Iterator

VAL_PERCENT = 2
CHUNK_CHARS = 8_000  # files are cut into documents of about this size, at blank lines
SOURCES = ("stdlib", "files:<glob>")
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
    raise ValueError(f"source: unknown source {spec!r}; allowed: {', '.join(SOURCES)}")


def _stdlib(split: str, skipped: list | None) -> Iterator[str]:
    import pydoc_data.topics

    for name, text in sorted(pydoc_data.topics.topics.items()):
        if split_of(f"pydoc_data:{name}") == split:
            yield text
    yield from _read_files(stdlib_files(), split, skipped)
