import json
import random

import pytest
import rustbpe
import tokenizers

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


def adversarial_texts() -> list[str]:
    """Texts that stress a tokenizer conversion: scripts, combining marks, emoji sequences, whitespace runs,
    digits of other scripts, contractions, special-token strings (whole, back to back, cut short), random bytes
    decoded with errors=replace, and one-character runs longer than any token."""
    rng = random.Random(0)
    noise = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))).decode("utf-8", errors="replace")
             for _ in range(200)]
    return [
        "naïve café — 東京 Привет مرحبا שלום नमस्ते ไทย 한국어 e\u0301 a\u0308\u0323",
        "🚀👨‍👩‍👧‍👦🏳️‍🌈🇫🇷 👍🏽 \u200b\u200d\ufeff zero-width",
        "   \t\t\n\n\r\n  \x0b\x0c   x  \n\n\n\n  \u00a0\u3000end   ",
        " " * 300, "\n" * 50, "a" * 500, "ab" * 300, "🙂" * 80,
        "1234567890 3.14159 1e-10 -0 007 ٣٤٥ ๑๒๓ ½ ²³ Ⅻ 1,000,000",
        "I'M don't WE'LL they'Re it's 'tis O'Neil",
        "<|bos|>text<|user_start|>hi<|user_end|><|assistant_start|><|assistant_end|><|bos|><|bos|>",
        "<|bos| <|bos|> <| bos |> <|python_start|>print(1)<|python_end|><|output_start|>1<|output_end|>",
        "\x00\x01\x7f\x80 control \ufffd\ufffd replacement", *noise, *SAMPLES]


def test_hugging_face_tokenizer_json_gives_the_same_ids(tmp_path, docs, tokenizer):
    """tokenizer.json, read by Hugging Face's `tokenizers` alone (no nanoray), encodes every text to our ids and
    decodes them back: special-token strings read as special tokens by default (our encode(special=True)), as
    plain text with encode_special_tokens (our default encode)."""
    tokenizer.save(tmp_path / "tok")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert hf.get_vocab_size() == tokenizer.vocab_size
    assert [hf.token_to_id(name) for name in SPECIAL_TOKENS] == [tokenizer.encode_special(n) for n in SPECIAL_TOKENS]
    rng = random.Random(1)  # texts made of token pieces, cut anywhere: every merge gets exercised
    pieces = [tokenizer.encoding.decode_single_token_bytes(i) for i in range(tokenizer.bos_id)]
    glued = [b"".join(rng.choices(pieces, k=rng.randint(1, 40))).decode("utf-8", errors="replace")
             for _ in range(1000)]
    texts = docs + adversarial_texts() + glued
    assert any(tokenizer.bos_id in tokenizer.encode(t, special=True) for t in texts)
    for text in texts:
        ids = tokenizer.encode(text, special=True)
        assert hf.encode(text).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids) == text
    hf.encode_special_tokens = True
    for text in texts:
        assert hf.encode(text).ids == tokenizer.encode(text), text


def test_a_folder_saved_before_hugging_face_s_tokenizer_json_still_loads_and_is_upgraded(tmp_path, docs, tokenizer):
    """Before, our config was named tokenizer.json; such a folder loads (told apart by its content), a prepared
    data directory holding one gets HF's tokenizer.json on its next prepare_data (not a new tokenizer), and
    `convert` writes today's format elsewhere (a checkpoint's files are never rewritten)."""
    from nanoray.stream import prepare_data
    from nanoray.tokenizer import main

    old = tmp_path / "data" / "tokenizer-1024"
    tokenizer.save(old)
    (old / "tokenizer.json").write_text((old / "nanoray_tokenizer.json").read_text())
    (old / "nanoray_tokenizer.json").unlink()
    ranks = (old / "ranks.tiktoken").read_text()
    assert not Tokenizer.is_saved(old) and Tokenizer.load(old).same_as(tokenizer)
    main(["convert", str(old), "--out", str(tmp_path / "converted")])
    assert Tokenizer.load(tmp_path / "converted").same_as(tokenizer)
    assert "pattern" in json.loads((old / "tokenizer.json").read_text())  # the old folder is untouched
    # no corpus is read: the tokenizer there is kept, and saved again in today's format
    assert prepare_data(f"parquet:{tmp_path}/no-shards", 1024, tmp_path / "data")[1] == str(old)
    assert Tokenizer.is_saved(old) and (old / "ranks.tiktoken").read_text() == ranks
    assert tokenizers.Tokenizer.from_file(str(old / "tokenizer.json")).encode(docs[0]).ids == tokenizer.encode(docs[0])
    # a folder with Hugging Face's tokenizer.json but not our config (a save cut short) has no tokenizer
    (old / "nanoray_tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        Tokenizer.load(old)


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
