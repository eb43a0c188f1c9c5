import pytest
import rustbpe

from nanoray.corpus import SPLITS, chunk_text, read_source, split_of
from nanoray.tokenizer import MIN_VOCAB, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

SAMPLES = ["Hello, world! 12345 and 1,000,000 tokens.", "naïve café — 東京 🚀 emoji\n\n\ttabs",
           "def f(x):\n    return x ** 2  # comment\n", "   leading spaces and trailing   ", ""]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return list(read_source("stdlib", "train"))[:300]


@pytest.fixture(scope="module")
def tokenizer(docs) -> Tokenizer:
    return Tokenizer.train(docs, vocab_size=1024)


def test_train_roundtrip_and_specials(tokenizer):
    assert tokenizer.vocab_size == 1024
    assert tokenizer.bos_id == 1024 - len(SPECIAL_TOKENS) == tokenizer.encode_special("<|bos|>")
    for text in SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text
        assert tokenizer.encode(text, bos=True) == [tokenizer.bos_id, *tokenizer.encode(text)]
    # special-token strings inside ordinary text stay ordinary text
    assert tokenizer.bos_id not in tokenizer.encode("<|bos|> is just text here")
    assert tokenizer.encode_batch(SAMPLES, bos=True) == [tokenizer.encode(t, bos=True) for t in SAMPLES]


def test_tiktoken_encoding_equals_rustbpe(docs, tokenizer):
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter([d[:10_000] for d in docs]), 1024 - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    assert dict(trainer.get_mergeable_ranks()) == tokenizer.encoding._mergeable_ranks  # same merges...
    for text in docs[:50] + SAMPLES:  # ...and tiktoken encodes exactly as rustbpe does
        assert tokenizer.encode(text) == trainer.encode(text)


def test_save_load_equality(tmp_path, docs, tokenizer):
    tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.bos_id == tokenizer.bos_id
    for text in docs[:50] + SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text)
    assert (tmp_path / "tok" / "ranks.tiktoken").read_text().count("\n") == 1024 - len(SPECIAL_TOKENS)


def test_token_bytes(tokenizer):
    lengths = tokenizer.token_bytes()
    assert lengths.shape == (tokenizer.vocab_size,) and lengths[:256].eq(1).all()
    assert lengths[tokenizer.bos_id:].eq(0).all()  # the special tokens count no bytes
    for text in SAMPLES:
        assert int(lengths[tokenizer.encode(text, bos=True)].sum()) == len(text.encode())


def test_bad_input(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=f"vocab_size: must be >= {MIN_VOCAB}"):
        Tokenizer.train(["some text"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        Tokenizer.load(tmp_path / "missing")
    tokenizer.save(tmp_path / "bad")
    ranks = tmp_path / "bad" / "ranks.tiktoken"
    ranks.write_text(ranks.read_text() + "not-a-valid-line\n")
    with pytest.raises(ValueError, match=r"ranks.tiktoken:1016: expected"):
        Tokenizer.load(tmp_path / "bad")


def test_corpus_splits_are_deterministic_and_disjoint(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n\n" + "word " * 50)
    spec = f"files:{tmp_path}/*.txt"
    train, val = list(read_source(spec, "train")), list(read_source(spec, "val"))
    assert len(train) + len(val) == 40 and not set(train) & set(val)
    assert list(read_source(spec, "val")) == val
    assert split_of("x") in SPLITS
    # several globs, comma-separated; a file two of them match is read once
    both = f"files:{tmp_path}/doc1*.txt,{tmp_path}/doc*.txt"
    assert sorted(read_source(both, "train")) == sorted(train)


def test_corpus_bad_input(tmp_path):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \xc3\x28")
    skipped = []
    docs = list(read_source(f"files:{tmp_path}/*.txt", "train", skipped)) + \
        list(read_source(f"files:{tmp_path}/*.txt", "val", skipped))
    assert docs == ["fine text"] and skipped[0][0].endswith("bad.txt") and "UnicodeDecodeError" in skipped[0][1]
    with pytest.raises(FileNotFoundError, match="no files match"):
        read_source(f"files:{tmp_path}/*.parquet")
    with pytest.raises(ValueError, match="source: unknown source 'web'"):
        read_source("web")
    with pytest.raises(ValueError, match="split: must be one of"):
        read_source("stdlib", "test")


def test_chunking():
    text = "\n\n".join(f"paragraph {i} " + "x" * 90 for i in range(100))
    chunks = chunk_text(text, size=1000)
    assert "\n\n".join(chunks) == text and all(len(c) <= 1000 for c in chunks)


def test_parquet_shards_roundtrip_and_bad_shards(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanoray.corpus import write_shards

    docs = [f"document number {i} " + "text " * (i % 7) for i in range(2500)]
    shards = write_shards(docs, tmp_path / "all", docs_per_shard=1000)
    assert [p.name for p in shards] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert not list((tmp_path / "all").glob(".*.tmp"))
    train = list(read_source(f"parquet:{tmp_path}/all", "train"))
    val = list(read_source(f"parquet:{tmp_path}/all", "val"))
    assert sorted(train + val) == sorted(docs) and 0 < len(val) < len(train)
    # a directory with train/ and val/ keeps the split that is on disk
    write_shards(["a train doc"], tmp_path / "split" / "train")
    write_shards(["a val doc"], tmp_path / "split" / "val")
    assert list(read_source(f"parquet:{tmp_path}/split", "val")) == ["a val doc"]
    # empty documents are a counted skip; a shard without `text`, or a corrupt one, names the file
    pq.write_table(pa.table({"text": ["", "  ", "kept"]}), tmp_path / "empty.parquet")
    skipped = []
    assert list(read_source(f"parquet:{tmp_path}/empty.parquet", "train", skipped)) + \
        list(read_source(f"parquet:{tmp_path}/empty.parquet", "val")) == ["kept"]
    assert [why for _, why in skipped] == ["empty document", "empty document"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "notext.parquet")
    with pytest.raises(ValueError, match=r"notext.parquet: no 'text' column \(columns: body\)"):
        list(read_source(f"parquet:{tmp_path}/notext.parquet"))
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="corrupt.parquet: not a readable parquet file"):
        list(read_source(f"parquet:{tmp_path}/corrupt.parquet"))
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        read_source(f"parquet:{tmp_path}/nothing-here")
