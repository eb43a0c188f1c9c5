"""Corpus sources: debian-docs on a fake package tree, parquet split rules (local, file://, s3 URI, hf: on
a fake Hub), bad shards, and the shard download (atomic writes, retries, a localhost HTTP server)."""

import functools
import gzip
import http.server
import json
import os
import re
import shutil
import struct
import threading
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from nanoray import corpus
from nanoray.corpus import (APT_INSTALL, DICTD_DIGITS, ParquetShards, austen_chapters, download, download_file,
                            download_plan, gcide_text, parquet_shards, pod_text, r_strings,
                            read_source, split_of, wordnet_line, write_shards)
from nanoray.storage import filesystem


def both_splits(spec: str, skipped: list | None = None) -> list[str]:
    return list(read_source(spec, "train", skipped)) + list(read_source(spec, "val", skipped))


# --- debian-docs on a fake tree ---

def dictd_number(n: int) -> str:
    digits = DICTD_DIGITS[n % 64]
    while n := n // 64:
        digits = DICTD_DIGITS[n % 64] + digits
    return digits


def r_serialize(strings: list[str | None], version: int = 3, latin1: bool = False) -> bytes:
    """R's XDR serialization of a character vector, as saveRDS/lazy-load DBs write it."""
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500 if version == 3 else 0x020300)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))  # STRSXP
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)  # NA_STRING
        else:
            data = s.encode("latin-1" if latin1 else "utf-8")
            out += struct.pack(">ii", 9 | ((1 << 2 if latin1 else 1 << 3) << 12), len(data)) + data
    return out


def rdb(objects: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(o)) + zlib.compress(o) for o in objects)


GCIDE_ENTRIES = [
    ("00-database-info", "00-database-info\n   This file was converted from the original database.\n"),
    ("Apple", 'Apple \\Ap"ple\\ ([a^]p"p\'l), n. [AS. [ae]ppel.]\n   1. The fleshy pome or fruit of a rosaceous\n'
              '      tree ({Pyrus malus}).\n      [1913 Webster]\n\n'
              '   2. Any tree bearing apples.\n      [1913 Webster]\n'),
    ("Encyclopedia", "Encyclopedia \\En*cy`clo*p[ae]\"di*a\\, n.\n   A work in which the arts are treated; as, the\n"
                     "   Encyclop[ae]dia Britannica; a caf['e] of learning.\n   [1913 Webster]\n"),
    ("Broken", "Broken \\Bro\"ken\\, a.\n   Not whole; caf\x92e.\n"),
]


def fake_debian_tree(root: Path) -> None:
    """A few files in each package's layout, with symlinked copies, skipped dirs and bad files."""
    dictd, data, index = root / "usr/share/dictd", b"", []
    for headword, entry in GCIDE_ENTRIES:
        raw = entry.encode("latin-1") if headword == "Broken" else entry.encode()
        index.append(f"{headword}\t{dictd_number(len(data))}\t{dictd_number(len(raw))}")
        if headword == "Apple":
            index.append(f"apple\t{dictd_number(len(data))}\t{dictd_number(len(raw))}")  # an alias: same span
        data += raw
    dictd.mkdir(parents=True)
    (dictd / "gcide.index").write_text("\n".join(index + ["not an index line"]) + "\n")
    (dictd / "gcide.dict.dz").write_bytes(gzip.compress(data))

    wordnet = root / "usr/share/wordnet"
    wordnet.mkdir(parents=True)
    (wordnet / "data.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by\n"
        "  2 Princeton University under the following license.\n"
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred  \n"
        "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; "
        '"the dog barked all night"  \n')
    (wordnet / "data.adj").write_text("00001740 00 a 01 able(p) 0 000 | (usually followed by `to') having the "
                                      "necessary means  \n")

    kernel = root / "usr/share/doc/linux-doc-6.1/Documentation"
    for rel, text in [("admin-guide/README.rst.gz", "Linux kernel release notes\n==========\n\nWhat is Linux?\n"),
                      ("process/howto.txt.gz", "HOWTO do Linux kernel development\n"),
                      ("translations/zh_CN/index.rst.gz", "skipped translation"),
                      ("devicetree/bindings/usage.txt.gz", "skipped devicetree"),
                      ("sphinx/requirements.txt.gz", "skipped sphinx")]:
        (kernel / rel).parent.mkdir(parents=True, exist_ok=True)
        (kernel / rel).write_bytes(gzip.compress(text.encode()))
    (kernel / "process/broken.rst.gz").write_bytes(b"\x1f\x8b not gzip at all")
    os.symlink("linux-doc-6.1", root / "usr/share/doc/linux-doc")

    python = root / "usr/share/doc/python3.11/html/_sources/library"
    python.mkdir(parents=True)
    (python / "os.rst.txt").write_text(":mod:`os` --- Miscellaneous operating system interfaces\n")
    (root / "usr/share/doc/python3").mkdir()
    os.symlink("../python3.11/html", root / "usr/share/doc/python3/html")  # the same files twice

    pod = root / "usr/share/perl/5.36.0/pod"
    pod.mkdir(parents=True)
    (pod / "perlintro.pod").write_text("=head1 NAME\n\nperlintro - a brief introduction to B<Perl>\n\n=cut\n")
    (pod / "perlbad.pod").write_bytes(b"=head1 NAME\n\nnot utf-8 \xff\xfe\n")
    os.symlink("5.36.0", root / "usr/share/perl/5.36")

    austen = root / "usr/lib/R/site-library/janeaustenr/data"
    austen.mkdir(parents=True)
    novel = ["EMMA", "", "By Jane Austen", "", "CHAPTER I", "", "Emma Woodhouse, handsome, clever,", "and rich.",
             "", "Second paragraph.", "CHAPTER II", "", "Mr. Knightley.", None]
    integers = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + struct.pack(">iii", 13, 1, 5)  # an INTSXP
    persuasion = r_serialize(["Persuasion", "", "Chapter 1", "", "Sir Walter Elliot."], version=2)
    (austen / "Rdata.rdb").write_bytes(rdb([r_serialize(novel), integers, persuasion]))


@pytest.fixture
def debian_root(tmp_path) -> Path:
    fake_debian_tree(tmp_path / "root")
    return tmp_path / "root"


def test_debian_docs_fake_tree(debian_root):
    spec, skipped = f"debian-docs:{debian_root}", []
    train, val = list(read_source(spec, "train", skipped)), list(read_source(spec, "val"))
    assert not set(train) & set(val) and list(read_source(spec, "val")) == val
    docs = "\n\n".join(train + val)
    assert ("Apple, n. 1. The fleshy pome or fruit of a rosaceous tree (Pyrus malus).\n2. Any tree bearing apples."
            "\n\nEncyclopedia, n. A work in which the arts are treated; as, the Encyclopædia Britannica; "
            "a café of learning.") in docs
    assert docs.count("The fleshy pome") == 1 and "database" not in docs  # aliases deduped, metadata dropped
    assert "entity (noun): that which is perceived or known or inferred" in docs  # lexicographer file 03
    assert 'dog, domestic dog (noun): a member of the genus Canis; "the dog barked all night"' in docs  # 05
    assert "able (adj): (usually followed by `to') having the necessary means" in docs
    assert "What is Linux?" in docs and "HOWTO do Linux" in docs and "skipped" not in docs
    assert docs.count("Miscellaneous operating system interfaces") == 1  # symlinked copies count once
    assert docs.count("perlintro - a brief introduction to Perl") == 1 and "=cut" not in docs
    assert "EMMA\n\nBy Jane Austen\n\nCHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich.\n\nSecond paragraph." \
        in docs and "CHAPTER II\n\nMr. Knightley." in docs and "Persuasion\n\nChapter 1\n\nSir Walter Elliot." in docs
    reasons = {re.sub(r".*/root/", "", what): why for what, why in skipped}
    assert reasons["usr/share/dictd/gcide.index:6"].startswith("not a dictd index line")
    assert reasons["usr/share/dictd/gcide.dict.dz@" + str(sum(len(e.encode()) for _, e in GCIDE_ENTRIES[:3]))] \
        .startswith("UnicodeDecodeError")
    assert reasons["usr/share/doc/linux-doc-6.1/Documentation/process/broken.rst.gz"].startswith("BadGzipFile")
    assert reasons["usr/share/perl/5.36.0/pod/perlbad.pod"].startswith("UnicodeDecodeError")
    [rdb_skip] = [why for what, why in reasons.items() if "Rdata.rdb@" in what]
    assert rdb_skip == "ValueError: not a character vector (R type 13)"
    assert len(skipped) == 5  # nothing else, and no package reported missing


def test_debian_docs_missing_packages(tmp_path, debian_root):
    with pytest.raises(FileNotFoundError, match=re.escape(f"\n{APT_INSTALL}")):
        read_source(f"debian-docs:{tmp_path / 'empty'}")
    assert APT_INSTALL == ("apt-get install -y --no-install-recommends dict-gcide wordnet-base linux-doc "
                           "python3-doc perl-doc r-cran-janeaustenr")
    for installed in ("usr/share/dictd", "usr/share/doc", "usr/share/perl", "usr/lib"):  # all but wordnet-base
        shutil.rmtree(debian_root / installed)
    skipped = []
    assert "entity (noun)" in "\n".join(both_splits(f"debian-docs:{debian_root}", skipped))
    missing = ["dict-gcide", "linux-doc", "python3-doc", "perl-doc", "r-cran-janeaustenr"]
    assert skipped == 2 * [(f"debian-docs:{p}", f"not installed under {debian_root}") for p in missing]


def test_markup_cleaners():
    assert gcide_text('Ab"a*cus \\Ab"a*cus\\, n. [L.]\n   A table; a {tray}. See [=a], [alpha], [Delta], [,c], '
                      "[oe].\n   [1913 Webster]\n") == "Abacus, n. A table; a tray. See ā, α, Δ, ç, œ."
    assert pod_text("=pod\n\n=head2 The C<< $x->y >> method\n\nUse I<this> E<lt>notE<gt> L<that|perlfunc/open>"
                    "X<index> E<0x41>E<075>E<eacute>.\n\n    verbatim B<kept>\n\n=begin html\n\n<p>gone</p>\n\n"
                    "=end html\n\n=over 4\n\n=item * one\n\n=back\n\n=cut\n") == \
        "The $x->y method\n\nUse this <not> that A=é.\n\n    verbatim B<kept>\n\n* one"
    assert wordnet_line("  12 license text") is None
    assert austen_chapters(["Title", "", "Chapter 1", "a", "b", "", "c", "Chapter 2", "d"]) == \
        ["Title\n\nChapter 1 a b\n\nc", "Chapter 2 d"]


def test_r_strings():
    assert r_strings(r_serialize(["a", None, "é東"])) == ["a", "é東"]  # NA dropped
    assert r_strings(r_serialize(["café"], version=2, latin1=True)) == ["café"]
    with pytest.raises(ValueError, match="not R's XDR"):
        r_strings(b"A\n1\n")


def test_debian_docs_real_packages():
    """The real packages when installed (apt-get install ... as in the error message); skipped otherwise."""
    files = corpus.debian_files("/")
    if "r-cran-janeaustenr" not in files:
        pytest.skip("r-cran-janeaustenr not installed")
    austen = corpus.DEBIAN_DOCS["r-cran-janeaustenr"]
    chapters = [doc for _, doc in austen.extract("/", files["r-cran-janeaustenr"], [])]
    assert len(chapters) == 269 and chapters[0].startswith("EMMA") and 3.9e6 < sum(map(len, chapters)) < 4.1e6


# --- parquet: split rules, filesystems, bad shards ---

def shards_of(directory: Path, names: list[str], rows: int = 60) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        pq.write_table(pa.table({"text": [f"{name} doc {i}" for i in range(rows)]}), directory / name)


def read_shards(shards: ParquetShards, split: str) -> list[str]:
    """What the Ray Data pipeline would read from `shards` (independent of read_source)."""
    filesystem = shards.filesystem or pafs.LocalFileSystem()
    docs = []
    for path in shards.paths:
        with filesystem.open_input_file(path) as f:
            texts = pq.read_table(f).column("text").to_pylist()
        docs += [t for row, t in enumerate(texts)
                 if not shards.row_split or split_of(f"{os.path.basename(path)}#{row}") == split]
    return docs


def test_parquet_split_rules(tmp_path):
    names = ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    shards_of(tmp_path / "many", names)
    shards_of(tmp_path / "one", ["only.parquet"])
    write_shards(["a train doc"], tmp_path / "split" / "train")
    write_shards(["a val doc"], tmp_path / "split" / "val")
    for location, train, val, row_split in [
            ("many", names[:2], names[2:], False), ("one", ["only.parquet"], ["only.parquet"], True),
            ("split", ["train/shard_00000.parquet"], ["val/shard_00000.parquet"], False)]:
        for spec in (f"parquet:{tmp_path / location}", f"parquet:file://{tmp_path / location}"):
            for split, expected in (("train", train), ("val", val)):
                shards = parquet_shards(spec, split)
                assert shards.paths == [str(tmp_path / location / name) for name in expected]
                assert shards.row_split == row_split and (shards.filesystem is None) == ("://" not in spec)
                assert list(read_source(spec, split)) == read_shards(shards, split)  # never disagree
    train, val = (list(read_source(f"parquet:{tmp_path}/one", s)) for s in ("train", "val"))
    assert sorted(train + val) == sorted(f"only.parquet doc {i}" for i in range(60)) and not set(train) & set(val)
    assert parquet_shards(f"parquet:{tmp_path}/many/*0[01].parquet", "val").paths == [str(tmp_path / "many" / names[1])]
    for spec in ("stdlib", f"files:{tmp_path}/*.txt", "debian-docs"):
        with pytest.raises(ValueError, match="write_shards"):
            parquet_shards(spec, "train")
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        parquet_shards(f"parquet:{tmp_path}/missing", "train")
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        parquet_shards(f"parquet:file://{tmp_path}/missing", "train")
    with pytest.raises(ValueError, match="split: must be one of"):
        parquet_shards(f"parquet:{tmp_path}/many", "test")


def test_hf_source_on_a_fake_hub(tmp_path, monkeypatch):
    import huggingface_hub
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    hub = tmp_path / "hub"
    names = [f"shard_{i:05d}.parquet" for i in range(4)]
    shards_of(hub / "datasets/karpathy/tiny", names, rows=5)
    (hub / "datasets/karpathy/tiny/README.md").write_text("not a shard")
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", lambda: DirFileSystem(str(hub), LocalFileSystem()))
    val = parquet_shards("hf:karpathy/tiny", "val")
    assert val.paths == ["datasets/karpathy/tiny/shard_00003.parquet"] and not val.row_split
    assert isinstance(val.filesystem, pafs.FileSystem)
    assert parquet_shards("hf:karpathy/tiny", "train").paths == [f"datasets/karpathy/tiny/{n}" for n in names[:3]]
    assert list(read_source("hf:karpathy/tiny", "val")) == [f"shard_00003.parquet doc {i}" for i in range(5)]
    with pytest.raises(ValueError, match="expected hf:<org>/<name>"):
        parquet_shards("hf:no-org", "train")


def test_s3_uri_filesystem():
    fs, path = filesystem("s3://anonymous@some-public-bucket/climbmix/shards?region=us-east-1")  # no network
    assert fs.type_name == "s3" and path == "some-public-bucket/climbmix/shards"
    assert fs.__reduce__()[1][0]["anonymous"] is True


def test_bad_parquet_rows(tmp_path):
    bad = pa.array([b"good text", b"\xff\xfe not utf-8", None, b"  ", b"more good"], pa.binary())
    pq.write_table(pa.table({"text": bad}), tmp_path / "binary.parquet")
    pq.write_table(pa.table({"text": bad.view(pa.string())}), tmp_path / "string.parquet")  # invalid UTF-8 in strings
    for name in ("binary", "string"):
        skipped = []
        assert both_splits(f"parquet:{tmp_path}/{name}.parquet", skipped) == ["good text", "more good"]
        assert [(what, why.split(":")[0]) for what, why in sorted(skipped)] == [
            (f"{name}.parquet#1", "UnicodeDecodeError"), (f"{name}.parquet#2", "empty document"),
            (f"{name}.parquet#3", "empty document")]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match=r"ints.parquet: 'text' column holds int64, not strings"):
        both_splits(f"parquet:{tmp_path}/ints.parquet")
    (tmp_path / "dir").mkdir()
    pq.write_table(pa.table({"text": ["ok"]}), tmp_path / "dir" / "a.parquet")
    (tmp_path / "dir" / "b.parquet").write_bytes(b"PAR1 truncated")
    docs = read_source(f"parquet:{tmp_path}/dir", "train")
    with pytest.raises(ValueError, match="b.parquet: not a readable parquet file"):  # a is train, b (last) is val
        list(read_source(f"parquet:{tmp_path}/dir", "val"))
    assert list(docs) == ["ok"]


def test_write_cli_keeps_written_shards(tmp_path, debian_root, capsys):
    corpus.main(["write", "--source", f"debian-docs:{debian_root}", "--out", str(tmp_path / "out"),
                 "--docs-per-shard", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train"]["shards"] >= 2 and summary["train"]["skipped"] == 5
    assert list(read_source(f"parquet:{tmp_path / 'out'}")) == list(read_source(f"debian-docs:{debian_root}"))
    assert summary["val"]["shards"] == 0  # the tree is too small for a val document: reading val says so
    with pytest.raises(FileNotFoundError, match="out/val': no .parquet files"):
        read_source(f"parquet:{tmp_path / 'out'}", "val")
    assert not list((tmp_path / "out").rglob("*.tmp"))


# --- download ---

def test_download_plan():
    files = [".gitattributes", "README.md"] + [f"shard_{i:05d}.parquet" for i in (2, 0, 3, 1)]
    assert download_plan(files, 2) == {"train": ["shard_00000.parquet", "shard_00001.parquet"],
                                       "val": ["shard_00003.parquet"]}
    assert download_plan(files, 100)["train"] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    with pytest.raises(ValueError, match="--shards: must be >= 1"):
        download_plan(files, 0)
    with pytest.raises(ValueError, match="need >= 2 parquet files"):
        download_plan(["README.md", "only.parquet"], 1)


def parquet_bytes(text: str) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": [text]}), sink)
    return sink.getvalue().to_pybytes()


def test_download_retries_and_atomic_writes(tmp_path):
    files = [f"data/shard_{i:05d}.parquet" for i in range(4)]
    served = {f"https://hub/datasets/org/name/resolve/main/{f}": parquet_bytes(f) for f in files}
    calls, sleeps = [], []

    def flaky(url, out):  # each URL: half a file and a dropped connection, then the whole file
        calls.append(url)
        out.write(served[url][:10])
        if calls.count(url) == 1:
            raise ConnectionResetError("connection dropped")
        out.write(served[url][10:])

    result = download("hf:org/name", 2, tmp_path, files=files, base_url="https://hub", fetch=flaky,
                      sleep=sleeps.append)
    assert result == dict(out=str(tmp_path), train=2, val=1, fetched=3) and sleeps == [2, 2, 2]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "train", "train/shard_00000.parquet", "train/shard_00001.parquet", "val", "val/shard_00003.parquet"]
    assert both_splits(f"parquet:{tmp_path}") == ["data/shard_00000.parquet", "data/shard_00001.parquet",
                                                  "data/shard_00003.parquet"]
    calls.clear()  # a second run skips what is there
    assert download("hf:org/name", 2, tmp_path, files=files, base_url="https://hub", fetch=flaky)["fetched"] == 0
    assert calls == []

    def html_page(url, out):
        out.write(b"<html>rate limited</html>")

    with pytest.raises(OSError, match=r"failed after 5 tries \(ValueError: the response is not a parquet file\)"):
        download_file("https://hub/x.parquet", tmp_path / "new" / "x.parquet", html_page, sleep=sleeps.append)
    assert sleeps[3:] == [2, 4, 8, 16] and list((tmp_path / "new").iterdir()) == []  # nothing half-written
    with pytest.raises(ValueError, match="expected hf:<org>/<name>"):
        download("parquet:org/name", 1, tmp_path, files=files)
    with pytest.raises(SystemExit):
        corpus.main(["download", "hf:no-org", "--shards", "1", "--out", str(tmp_path)])


def test_download_over_http(tmp_path, monkeypatch):
    for variable in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    site = tmp_path / "site" / "datasets/org/name/resolve/main"
    site.mkdir(parents=True)
    files = ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    for f in files:
        (site / f).write_bytes(parquet_bytes(f))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert download("hf:org/name", 1, tmp_path / "out", files=files, base_url=base)["fetched"] == 2
        with pytest.raises(OSError, match="failed after 5 tries .*HTTPError: HTTP Error 404"):
            download_file(f"{base}/datasets/org/name/resolve/main/missing.parquet", tmp_path / "m.parquet",
                          sleep=lambda s: None)
    finally:
        server.shutdown()
    assert both_splits(f"parquet:{tmp_path / 'out'}") == ["shard_00000.parquet", "shard_00002.parquet"]
    assert not (tmp_path / "m.parquet").exists() and not list((tmp_path / "out").rglob("*.tmp"))
