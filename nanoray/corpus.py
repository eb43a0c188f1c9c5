"""Corpus sources: where documents (plain text) come from, before tokenization.

`read_source(spec, split)` yields the documents of one split. Sources that are not parquet split the
same way: a document goes to `val` when the CRC32 of its key (file path + chunk number, or topic name)
falls in the first VAL_PERCENT of the range, so the split is deterministic, disjoint and stable as a
corpus grows. Parquet sources follow `parquet_shards`, which is also what the Ray Data pipeline reads.

Sources:
    stdlib                 CPython's own library sources and pydoc_data topics: every Python has them (~30 MB)
    files:<glob>[,<glob>]  text files from disk, chunked into documents at blank lines
    debian-docs[:<root>]   English prose from Debian packages under root (default /): dict-gcide,
                           wordnet-base, linux-doc, python3-doc, perl-doc, r-cran-janeaustenr (~90 MB);
                           the packages present are used, the others skipped
    parquet:<dir|glob|uri> parquet shards with a `text` column (one document per row), local or in an
                           object store (s3://bucket/prefix; s3://anonymous@bucket/prefix for public ones)
    hf:<org>/<name>        a Hugging Face dataset's parquet shards, streamed (e.g. hf:karpathy/climbmix-400b-shuffle)

Parquet splits (`parquet_shards`): a directory with train/ and val/ inside keeps that split; otherwise
the shards are sorted and the last one is val (nanochat's rule); a single shard splits by row.

    python -m nanoray.corpus write --source stdlib --out runs/data/stdlib     # -> train/*.parquet, val/*.parquet
    python -m nanoray.corpus download hf:karpathy/climbmix-400b-shuffle --shards 170 --out runs/data/climbmix
"""

import argparse
import glob
import gzip
import html
import http.client
import json
import os
import re
import shutil
import struct
import sys
import sysconfig
import time
import unicodedata
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nanoray.storage import atomic_file, filesystem as filesystem_of

VAL_PERCENT = 2
CHUNK_CHARS = 8_000  # files are cut into documents of about this size, at blank lines
PACK_CHARS = 4_000  # dictionary entries and WordNet synsets are packed into documents of about this size
SOURCES = ("stdlib", "files:<glob>", "debian-docs[:<root>]", "parquet:<dir|glob|uri>", "hf:<org>/<name>")
ROW_GROUP_DOCS = 1024
SPLITS = ("train", "val")
DEBIAN_PACKAGES = ("dict-gcide", "wordnet-base", "linux-doc", "python3-doc", "perl-doc", "r-cran-janeaustenr")
APT_INSTALL = f"apt-get install -y --no-install-recommends {' '.join(DEBIAN_PACKAGES)}"
HF_URL = os.environ.get("HF_ENDPOINT", "https://huggingface.co")  # or a mirror


def split_of(key: str) -> str:
    return "val" if zlib.crc32(key.encode()) % 100 < VAL_PERCENT else "train"


def pack(pieces: Iterable[str], size: int, sep: str) -> list[str]:
    """Join pieces with `sep` into documents of about `size` characters (a longer piece stays whole)."""
    docs, current, length = [], [], 0
    for piece in pieces:
        if current and length + len(piece) > size:
            docs.append(sep.join(current))
            current, length = [], 0
        current.append(piece)
        length += len(piece) + len(sep)
    if current:
        docs.append(sep.join(current))
    return [d for d in docs if d.strip()]


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut text into pieces of about `size` characters at blank lines (a longer paragraph stays whole)."""
    return pack(text.split("\n\n"), size, "\n\n")


def _until_stable(pattern: str, replacement, text: str) -> str:
    """re.sub repeated until nothing changes (resolves nested markup from the inside out)."""
    while (replaced := re.sub(pattern, replacement, text, flags=re.S)) != text:
        text = replaced
    return text


def _skip(skipped: list | None, what: str, why: str) -> None:
    if skipped is not None:
        skipped.append((what, why))


def _read_files(paths: list[str], split: str, skipped: list | None = None) -> Iterator[str]:
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError) as e:
            _skip(skipped, path, f"{type(e).__name__}: {e}")
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


# --- debian-docs: each extractor yields (key, document); keys are paths relative to the root ---

def _decode(data: bytes, what: str, skipped: list | None) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        _skip(skipped, what, f"UnicodeDecodeError: {e}")
        return None


def _read_bytes(path: str, skipped: list | None) -> bytes | None:
    """A file's bytes (gunzipped for .gz / .dz), or None with the reason in `skipped`."""
    try:
        with (gzip.open if path.endswith((".gz", ".dz")) else open)(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        _skip(skipped, path, f"{type(e).__name__}: {e}")
        return None


DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_MARKS = {"^": "\u0302", "=": "\u0304", "'": "\u0301", "`": "\u0300", '"': "\u0308", "~": "\u0303",
          ".": "\u0323", ",": "\u0327", "*": "\u030a", "-": ""}
_GCIDE_SYMBOLS = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "yogh": "ȝ", "ng": "ŋ",
                  "th": "th", "imac": "ī", "aum": "ä", "asl": "ā", "add": "ä", "udd": "ü", "deg": "°",
                  "sect": "§", "pounds": "£", "root": "√", "flat": "♭", "sharp": "♯"}


def _dictd_number(digits: str) -> int:
    n = 0
    for d in digits:
        n = n * 64 + DICTD_DIGITS.index(d)
    return n


def _gcide_letter(m: re.Match) -> str:
    """One GCIDE letter code ([ae], [=a], [a^], ['e], [alpha], ...) as Unicode; other [...] stay as they are."""
    code = m.group(1)
    if code in _GCIDE_SYMBOLS:
        return _GCIDE_SYMBOLS[code]
    if code[-1] == "^" and code[:-1].isalpha():  # [a^]: breve
        return unicodedata.normalize("NFC", code[:-1] + "\u0306")
    if code[0] in _MARKS and code[1:].isalpha():  # [^a] circumflex, [=a] macron, ['a] acute, ...
        return unicodedata.normalize("NFC", _GCIDE_SYMBOLS.get(code[1:], code[1:]) + _MARKS[code[0]])
    if code.isalpha():  # [alpha], [Delta]
        case = "CAPITAL" if code[0].isupper() else "SMALL"
        try:
            return unicodedata.lookup(f"GREEK {case} LETTER {code.upper()}")
        except KeyError:
            pass
    return m.group(0)


def gcide_text(entry: str) -> str:
    """A GCIDE entry as plain text: letters to Unicode; pronunciations, [...] spans (etymologies, source
    tags) and stress marks dropped; {links} unwrapped; hard-wrapped lines joined (one line a paragraph)."""
    text = re.sub(r"\[([^\[\]\s]{1,6})\]", _gcide_letter, entry)
    text = re.sub(r"\\[^\\\n]*\\(\s*\([^()\n]*\))?", "", text)  # \pro*nun"ci*a`tion\ (respelling)
    text = _until_stable(r"\[[^\[\]]*\]", "", text)
    text = _until_stable(r"\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"(?<=\w)[\"*`](?=\w)", "", text)
    paragraphs = (re.sub(r"\s+([,;.])", r"\1", " ".join(p.split())) for p in re.split(r"\n\s*\n", text))
    return "\n".join(p for p in paragraphs if p)


def _gcide(root: str, paths: list[str], skipped: list | None) -> Iterator[tuple[str, str]]:
    for index in paths:
        name = _relative(root, index).removesuffix(".index")
        raw_index = _read_bytes(index, skipped)
        data = _read_bytes(index.removesuffix(".index") + ".dict.dz", skipped)
        if raw_index is None or data is None:
            continue
        spans, metadata = set(), set()  # metadata: 00-database-info, 00-gcide-url, ... and their aliases
        for number, line in enumerate(raw_index.decode("utf-8", "replace").splitlines(), 1):
            fields = line.split("\t")
            if len(fields) != 3 or not all(re.fullmatch(r"[A-Za-z0-9+/]+", f) for f in fields[1:]):
                _skip(skipped, f"{index}:{number}", "not a dictd index line (headword, offset, length)")
                continue
            span = (_dictd_number(fields[1]), _dictd_number(fields[2]))
            (metadata if fields[0].startswith(("00-", "00database")) else spans).add(span)
        spans -= metadata
        entries = (_decode(data[start:start + length], f"{name}.dict.dz@{start}", skipped)
                   for start, length in sorted(spans))
        texts = (gcide_text(entry) for entry in entries if entry is not None)
        for i, doc in enumerate(pack((t for t in texts if t), PACK_CHARS, "\n\n")):
            yield f"{name}#{i}", doc


WORDNET_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}


def wordnet_line(line: str) -> str | None:
    """One synset line of a WordNet data file as "lemma, lemma (pos): gloss"; None for license lines."""
    if line.startswith("  ") or "|" not in line:
        return None
    fields, gloss = line.split("|", 1)
    fields = fields.split()
    words = fields[4:4 + 2 * int(fields[3], 16):2]
    lemmas = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words]
    return f"{', '.join(lemmas)} ({WORDNET_POS.get(fields[2], fields[2])}): {gloss.strip()}"


def _wordnet(root: str, paths: list[str], skipped: list | None) -> Iterator[tuple[str, str]]:
    for path in paths:
        data = _read_bytes(path, skipped)
        text = None if data is None else _decode(data, path, skipped)
        if text is None:
            continue
        by_lexfile: dict[str, list[str]] = {}  # synsets grouped by lexicographer file (noun.animal, ...)
        for number, line in enumerate(text.splitlines(), 1):
            try:
                synset = wordnet_line(line)
            except (IndexError, ValueError):
                _skip(skipped, f"{path}:{number}", "not a WordNet synset line")
                continue
            if synset:
                by_lexfile.setdefault(line.split()[1], []).append(synset)
        for lexfile, synsets in by_lexfile.items():
            for i, doc in enumerate(pack(synsets, PACK_CHARS, "\n")):
                yield f"{_relative(root, path)}:{lexfile}#{i}", doc


def pod_text(pod: str) -> str:
    """Perl POD as text: command paragraphs reduced to their text (=head, =item) or dropped, =begin/=end
    blocks dropped, formatting codes (B<...>, C<< ... >>, L<text|target>, E<gt>) resolved."""
    out, in_block = [], False
    for para in re.split(r"\n[ \t]*\n", pod):
        command = re.match(r"=(\w+)\s*(.*)", para, re.S)
        if command:
            name, rest = command.groups()
            in_block = name == "begin" or (in_block and name != "end")
            if name.startswith("head") or name == "item":
                out.append(_pod_codes(rest.strip()))
        elif not in_block and para.strip():
            out.append(para if para[0] in " \t" else _pod_codes(para))  # verbatim paragraphs stay as they are
    return "\n\n".join(p for p in out if p)


def _pod_code(m: re.Match) -> str:
    code, inner = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
    if code in "XZ":
        return ""
    if code == "E":  # E<gt>, E<eacute>, E<0x201E>, E<075> (octal), E<181>
        named = {"lt": "<", "gt": ">", "sol": "/", "verbar": "|"}
        if inner in named:
            return named[inner]
        number = re.fullmatch(r"(0x[0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*)", inner)
        if number:
            value = int(inner, 16 if number[1] else 8 if number[2] else 10)
            return chr(value) if value < 0x110000 else ""
        return html.unescape(f"&{inner};")
    if code == "L":
        return inner.split("|", 1)[0]
    return inner


def _pod_codes(text: str) -> str:
    return _until_stable(r"([A-Z])(?:<<+\s+(.*?)\s+>>+|<([^<>]*)>)", _pod_code, text)


def _text_files(clean: Callable[[str], str] = lambda text: text):
    """An extractor for text files (gzipped or not), cleaned by `clean` and cut with chunk_text."""
    def extract(root: str, paths: list[str], skipped: list | None) -> Iterator[tuple[str, str]]:
        for path in paths:
            data = _read_bytes(path, skipped)
            text = None if data is None else _decode(data, path, skipped)
            for i, chunk in enumerate(chunk_text(clean(text)) if text else []):
                yield f"{_relative(root, path)}#{i}", chunk
    return extract


def r_strings(serialized: bytes) -> list[str]:
    """The character vector in one object of R's XDR serialization (format "X", version 2 or 3)."""
    if serialized[:2] != b"X\n":
        raise ValueError("not R's XDR serialization")
    version, pos = struct.unpack_from(">i", serialized, 2)[0], 14
    if version == 3:  # the native-encoding name follows the header
        pos += 4 + struct.unpack_from(">i", serialized, pos)[0]
    flags, length = struct.unpack_from(">ii", serialized, pos)
    pos += 8
    if flags & 0xFF != 16:
        raise ValueError(f"not a character vector (R type {flags & 0xFF})")
    strings = []
    for _ in range(length):
        flags, n = struct.unpack_from(">ii", serialized, pos)
        pos += 8
        if n >= 0:  # -1 is NA
            strings.append(serialized[pos:pos + n].decode("latin-1" if flags & (1 << 14) else "utf-8"))
            pos += n
    return strings


def austen_chapters(lines: list[str]) -> list[str]:
    """A novel's lines as one document per chapter (front matter goes with chapter 1), lines joined
    into paragraphs."""
    chapters: list[list[str]] = [[]]
    after_heading = False
    for line in lines:
        heading = re.fullmatch(r"chapter\s+[0-9ivxlc]+\.?\s*", line, re.I) is not None  # CHAPTER XII, Chapter 3
        if heading and after_heading:
            chapters.append([])
        after_heading |= heading
        chapters[-1].append(line)
    paragraphs = (re.split(r"\n\s*\n", "\n".join(chapter)) for chapter in chapters)
    return [doc for doc in ("\n\n".join(" ".join(p.split()) for p in ps if p.strip()) for ps in paragraphs) if doc]


def _austen(root: str, paths: list[str], skipped: list | None) -> Iterator[tuple[str, str]]:
    """R lazy-load DBs: blocks of a 4-byte (uncompressed) length + zlib data, each one R object."""
    for path in paths:
        data, pos, block = _read_bytes(path, skipped), 0, 0
        while data is not None and pos < len(data):
            inflate = zlib.decompressobj()
            try:
                serialized = inflate.decompress(data[pos + 4:])
                if not inflate.eof or len(serialized) != struct.unpack_from(">I", data, pos)[0]:
                    raise ValueError("truncated block")
            except (zlib.error, ValueError, struct.error) as e:
                _skip(skipped, f"{path}@{pos}", f"{type(e).__name__}: {e}")
                break
            try:
                lines = r_strings(serialized)
            except (ValueError, struct.error, UnicodeDecodeError) as e:
                _skip(skipped, f"{path}@{pos}", f"{type(e).__name__}: {e}")
            else:
                for i, chapter in enumerate(austen_chapters(lines)):
                    yield f"{_relative(root, path)}#{block}.{i}", chapter
            pos, block = len(data) - len(inflate.unused_data), block + 1


def _kernel_doc_skipped(path: str) -> bool:
    parts = path.split(os.sep)
    return "translations" in parts or "devicetree" in parts or any(p.startswith("sphinx") for p in parts)


class DebianSource(NamedTuple):
    patterns: list[str]  # globs under the root
    extract: Callable[[str, list[str], list | None], Iterator[tuple[str, str]]]  # (root, paths, skipped) -> docs
    leave_out: Callable[[str], bool] | None = None  # paths (relative to the root) to leave out


DEBIAN_DOCS = {
    "dict-gcide": DebianSource(["usr/share/dictd/gcide.index"], _gcide),
    "wordnet-base": DebianSource([f"usr/share/wordnet/data.{pos}" for pos in ("noun", "verb", "adj", "adv")], _wordnet),
    "linux-doc": DebianSource([f"usr/share/doc/linux-doc-*/Documentation/**/*.{kind}.gz" for kind in ("rst", "txt")],
                              _text_files(), _kernel_doc_skipped),
    "python3-doc": DebianSource(["usr/share/doc/python3*/html/_sources/**/*.rst.txt"], _text_files()),
    "perl-doc": DebianSource(["usr/share/perl/*/pod/*.pod"], _text_files(pod_text)),
    "r-cran-janeaustenr": DebianSource(["usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"], _austen),
}


def _relative(root: str, path: str) -> str:
    return os.path.relpath(path, os.path.realpath(root))


def debian_files(root: str) -> dict[str, list[str]]:
    """The files of each Debian package present under root, by real path (symlinked copies count once)."""
    found = {}
    for package, source in DEBIAN_DOCS.items():
        real = {os.path.realpath(path) for pattern in source.patterns
                for path in glob.glob(os.path.join(root, pattern), recursive=True)}
        paths = sorted(p for p in real if os.path.isfile(p)
                       and not (source.leave_out and source.leave_out(_relative(root, p))))
        if paths:
            found[package] = paths
    return found


def _debian_docs(root: str, split: str, skipped: list | None) -> Iterator[str]:
    found = debian_files(root)
    if not found:
        raise FileNotFoundError(f"debian-docs: none of the packages is installed under {root!r}; as root:\n"
                                f"apt-get update\n{APT_INSTALL}")

    def docs():
        for package in DEBIAN_PACKAGES:
            if package not in found:
                _skip(skipped, f"debian-docs:{package}", f"not installed under {root}")
                continue
            for key, doc in DEBIAN_DOCS[package].extract(root, found[package], skipped):
                if split_of(key) == split:
                    yield doc
    return docs()


# --- parquet: local, object store, Hugging Face ---

@dataclass(frozen=True)
class ParquetShards:
    """The parquet files of one split, as the Ray Data pipeline reads them."""
    paths: list[str]  # sorted shard paths of one split, as `filesystem` understands them
    filesystem: pafs.FileSystem | None  # None = local files
    row_split: bool  # True: the files hold both splits; row r of a file is in split_of(f"{basename}#{r}")


def parquet_shards(spec: str, split: str) -> ParquetShards:
    """The shards of `split` for a parquet: or hf: source. A location with train/ and val/ inside keeps
    that split; otherwise the last of >= 2 sorted shards is val and the rest train; one shard splits by row."""
    _check_split(split)
    if spec.startswith("hf:"):
        filesystem, location = _hf_filesystem(), f"datasets/{_hf_repo(spec)}"
    elif spec.startswith("parquet:"):
        location = spec.removeprefix("parquet:")
        filesystem, location = filesystem_of(location) if "://" in location else (None, location)
    else:
        raise ValueError(f"source {spec!r}: not parquet; write it as parquet shards first "
                         f"(write_shards, or python -m nanoray.corpus write --source {spec} --out DIR)")
    if any(_is_dir(filesystem, f"{location.rstrip('/')}/{s}") for s in SPLITS):  # as write_shards lays it out
        return ParquetShards(_list_parquet(filesystem, f"{location.rstrip('/')}/{split}"), filesystem, False)
    paths = _list_parquet(filesystem, location)
    if len(paths) == 1:
        return ParquetShards(paths, filesystem, True)
    return ParquetShards(paths[-1:] if split == "val" else paths[:-1], filesystem, False)


def _hf_repo(spec: str) -> str:
    repo = spec.removeprefix("hf:")
    if not spec.startswith("hf:") or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ValueError(f"source {spec!r}: expected hf:<org>/<name>")
    return repo


def _hf_filesystem() -> pafs.FileSystem:
    from huggingface_hub import HfFileSystem

    return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem()))


def _is_dir(filesystem: pafs.FileSystem | None, path: str) -> bool:
    if filesystem is None:
        return os.path.isdir(path)
    return filesystem.get_file_info(path).type == pafs.FileType.Directory


def _list_parquet(filesystem: pafs.FileSystem | None, location: str) -> list[str]:
    """Shards under a directory (recursively), matching a local glob, or the file itself; sorted."""
    if filesystem is None:
        pattern = os.path.join(location, "**", "*.parquet") if os.path.isdir(location) else location
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    else:
        info = filesystem.get_file_info(location)
        if info.type == pafs.FileType.Directory:
            found = filesystem.get_file_info(pafs.FileSelector(location, recursive=True))
            paths = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
        else:
            paths = [location] if info.type == pafs.FileType.File else []
    if not paths:
        raise FileNotFoundError(f"parquet source {location!r}: no .parquet files there")
    return paths


def parquet_paths(location: str) -> list[str]:
    """Local shards under a directory (recursively) or matching a glob, sorted."""
    return _list_parquet(None, location)


def _read_parquet(shards: ParquetShards, split: str, skipped: list | None) -> Iterator[str]:
    """Rows of the `text` column (of `split` when the files hold both), one row group at a time. A
    corrupt shard or one without a `text` column raises, naming the file; empty documents and ones that
    are not UTF-8 are counted skips."""
    filesystem = shards.filesystem or pafs.LocalFileSystem()
    for path in shards.paths:
        try:
            source = filesystem.open_input_file(path)
        except OSError as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from e
        with source:
            try:
                shard = pq.ParquetFile(source)
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{path}: not a readable parquet file ({e})") from e
            schema = shard.schema_arrow
            if "text" not in schema.names:
                raise ValueError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})")
            kind = schema.field("text").type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                    or pa.types.is_large_binary(kind)):
                raise ValueError(f"{path}: 'text' column holds {kind}, not strings")
            row = 0
            for group in range(shard.num_row_groups):
                try:
                    column = shard.read_row_group(group, columns=["text"]).column("text")
                except (pa.ArrowInvalid, OSError) as e:
                    raise ValueError(f"{path}: row group {group} is not readable ({e})") from e
                for value in column.cast(pa.large_binary()).to_pylist():  # decoded here: bad UTF-8 is a skip
                    key, row = f"{os.path.basename(path)}#{row}", row + 1
                    if shards.row_split and split_of(key) != split:
                        continue
                    text = _decode(value, key, skipped) if value else ""
                    if text is None:
                        continue
                    if not text.strip():
                        _skip(skipped, key, "empty document")
                        continue
                    yield text


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")


def read_source(spec: str, split: str = "train", skipped: list | None = None) -> Iterator[str]:
    """Documents of `split` from the source `spec` (checked now, read lazily). Unreadable files and
    documents are skipped and, with their reason, appended to `skipped`."""
    _check_split(split)
    if spec == "stdlib":
        return _stdlib(split, skipped)
    if spec.startswith("files:"):
        patterns = spec.removeprefix("files:").split(",")
        paths = sorted({p for pattern in patterns for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)})
        if not paths:
            raise FileNotFoundError(f"source {spec!r}: no files match {', '.join(patterns)}")
        return _read_files(paths, split, skipped)
    if spec == "debian-docs" or spec.startswith("debian-docs:"):
        return _debian_docs(spec.removeprefix("debian-docs").removeprefix(":") or "/", split, skipped)
    if spec.startswith(("parquet:", "hf:")):
        return _read_parquet(parquet_shards(spec, split), split, skipped)
    raise ValueError(f"source: unknown source {spec!r}; allowed: {', '.join(SOURCES)}")


def write_shards(docs: Iterable[str], out_dir: str | os.PathLike,
                 docs_per_shard: int = 8 * ROW_GROUP_DOCS) -> list[Path]:
    """Write documents as parquet shards shard_00000.parquet, ... (each written to a temp name, then renamed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, batch = [], []

    def flush():
        path = out_dir / f"shard_{len(written):05d}.parquet"
        with atomic_file(path) as tmp:
            pq.write_table(pa.table({"text": batch}), tmp, row_group_size=ROW_GROUP_DOCS, compression="zstd")
        written.append(path)

    for doc in docs:
        batch.append(doc)
        if len(batch) == docs_per_shard:
            flush()
            batch = []
    if batch:
        flush()
    return written


# --- download: a Hugging Face dataset's shards as local train/ and val/ (for clusters without hf streaming) ---

def fetch_url(url: str, out) -> None:
    """Copy the body of `url` into the binary file `out`."""
    with urllib.request.urlopen(url, timeout=60) as response:
        shutil.copyfileobj(response, out, 1 << 20)


# network errors, timeouts and HTTP errors (OSError), a body cut short, a response that is not parquet
RETRIED = (OSError, http.client.HTTPException, ValueError)


def with_retries(what: str, attempt: Callable[[], object], tries: int = 5, sleep=time.sleep):
    """attempt() until it succeeds, waiting 2, 4, 8, ... s between tries (nanochat's backoff)."""
    for i in range(1, tries + 1):
        try:
            return attempt()
        except RETRIED as e:
            if i == tries:
                raise OSError(f"{what}: failed after {tries} tries ({type(e).__name__}: {e})") from e
            print(f"{what}: {type(e).__name__}: {e}; retrying in {2 ** i} s", file=sys.stderr)
            sleep(2 ** i)


def download_plan(files: list[str], shards: int) -> dict[str, list[str]]:
    """nanochat's rule: of the sorted parquet files, the first `shards` are train and the last is val."""
    files = sorted(f for f in files if f.endswith(".parquet"))
    if len(files) < 2:
        raise ValueError(f"download: need >= 2 parquet files (train + val), the dataset has {len(files)}")
    if shards < 1:
        raise ValueError(f"--shards: must be >= 1, got {shards}")
    return {"train": files[:min(shards, len(files) - 1)], "val": files[-1:]}


def _parquet_magic(path: Path) -> bool:
    """A parquet file starts and ends with PAR1 (an error page or a cut-off body does not)."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(os.path.getsize(path) - 4, 4))
        return head == b"PAR1" and f.read(4) == b"PAR1"


def download_file(url: str, path: Path, fetch=fetch_url, sleep=time.sleep) -> bool:
    """Fetch url to path through a temp file and a rename (never a half file under the real name).
    A file already there is kept; returns whether it was fetched."""
    if path.exists():
        return False

    def attempt():
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as out:
                fetch(url, out)
            if path.suffix == ".parquet" and not _parquet_magic(tmp):
                raise ValueError("the response is not a parquet file")
    with_retries(url, attempt, sleep=sleep)
    return True


def download(spec: str, shards: int, out_dir: str | os.PathLike, files: list[str] | None = None,
             base_url: str = HF_URL, fetch=fetch_url, sleep=time.sleep) -> dict:
    """Shards 0..shards-1 of hf:<org>/<name> into out_dir/train and the last shard into out_dir/val.
    `files` (the repository's file names) is listed from the Hub when not given."""
    repo = _hf_repo(spec)
    if files is None:
        from huggingface_hub import HfApi

        files = with_retries(f"listing {spec}", lambda: HfApi(endpoint=base_url).list_repo_files(
            repo, repo_type="dataset"), sleep=sleep)
    plan = download_plan(files, shards)
    fetched = 0
    for split, names in plan.items():
        for file in names:
            url = f"{base_url}/datasets/{repo}/resolve/main/{urllib.parse.quote(file)}"
            fetched += download_file(url, Path(out_dir) / split / os.path.basename(file), fetch, sleep)
    return dict(out=str(out_dir), train=len(plan["train"]), val=len(plan["val"]), fetched=fetched)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanoray.corpus", description="Corpus sources as parquet shards.")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a corpus source as train/ and val/ parquet shards")
    w.add_argument("--source", default="stdlib", help=f"one of {', '.join(SOURCES)}")
    w.add_argument("--out", required=True, help="output directory (gets train/ and val/)")
    w.add_argument("--docs-per-shard", type=int, default=8 * ROW_GROUP_DOCS)
    d = sub.add_parser("download", help="fetch a Hugging Face dataset's shards into train/ and val/")
    d.add_argument("source", help="hf:<org>/<name>")
    d.add_argument("--shards", type=int, required=True, help="train shards to fetch (the last shard is val)")
    d.add_argument("--out", required=True, help="output directory (gets train/ and val/)")
    args = p.parse_args(argv)
    if args.command == "download":
        try:
            print(json.dumps(download(args.source, args.shards, args.out)))
        except (ValueError, OSError) as e:
            p.error(str(e))
        return
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
