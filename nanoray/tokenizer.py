"""The BPE tokenizer: trained with rustbpe, encoded with tiktoken, saved as readable text.

Byte-level BPE with nanochat's split pattern (GPT-4's, but digit runs split in groups of 1-2) and
nanochat's nine special tokens after the merges (`<|bos|>` first). On disk, a tokenizer is a folder:

    nanoray_tokenizer.json  {"pattern": ..., "special_tokens": {name: id}, "vocab_size": ...}
    ranks.tiktoken          one "<base64 token bytes> <rank>" line per ordinary token (tiktoken's format)
    tokenizer.json          the same tokenizer for Hugging Face's `tokenizers` (same ids; written, never read)

A folder saved before nanoray_tokenizer.json existed holds our config under the name tokenizer.json; it still
loads (told apart by its content).

Text to tokens and back for chat: `render_chat` (nanochat's conversation format) and `TextStream`
(incremental detokenization that never splits a UTF-8 character), so the inference engine stays
token-in, token-out.

    python -m nanoray.tokenizer train --source stdlib --vocab-size 4096 --out runs/tokenizer
    python -m nanoray.tokenizer convert runs/old/ckpt/tokenizer --out runs/old-tokenizer   # adds tokenizer.json
"""

import argparse
import base64
import codecs
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import rustbpe
import tiktoken
import tokenizers
import torch

from nanoray.corpus import read_source
from nanoray.storage import exists, join, read_bytes, write_bytes

SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
BOS = SPECIAL_TOKENS[0]  # every document starts with it
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
CONFIG, RANKS, HF_TOKENIZER = "nanoray_tokenizer.json", "ranks.tiktoken", "tokenizer.json"


class Tokenizer:
    """A tiktoken Encoding plus what training needs: the BOS id and every token's byte length."""

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.bos_id = encoding.encode_single_token(BOS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, doc_cap: int = 10_000,
              max_chars: int | None = None) -> "Tokenizer":
        """Learn vocab_size - 9 byte-level tokens from `texts` (each cropped to doc_cap characters)."""
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size: must be >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
                             f"tokens), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(_capped(texts, doc_cap, max_chars), vocab_size - len(SPECIAL_TOKENS),
                                    pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls.from_ranks(ranks)

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(tiktoken.Encoding(name="nanoray", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=specials))

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.encoding._special_tokens)

    def encode(self, text: str, bos: bool = False, special: bool = False) -> list[int]:
        """Text to ids. Special-token strings in `text` ("<|bos|>") are plain text, unless `special`: then they
        are those tokens (as Hugging Face tokenizers and vLLM read a prompt)."""
        ids = self.encoding.encode(text, allowed_special="all") if special else self.encoding.encode_ordinary(text)
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str], bos: bool = False, num_threads: int = 4) -> list[list[int]]:
        batch = self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)
        return [[self.bos_id, *ids] for ids in batch] if bos else batch

    def encode_special(self, name: str) -> int:
        return self.encoding.encode_single_token(name)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def same_as(self, other: "Tokenizer") -> bool:
        """Whether `other` gives every text the same ids (the same split pattern, merges and special tokens)."""
        a, b = self.encoding, other.encoding
        return (a._pat_str, a._mergeable_ranks, a._special_tokens) == (b._pat_str, b._mergeable_ranks,
                                                                       b._special_tokens)

    def token_bytes(self) -> torch.Tensor:
        """int32 (vocab_size,): UTF-8 byte length of each token's raw bytes, 0 for special tokens (for bpb)."""
        special = set(self.encoding._special_tokens.values())
        return torch.tensor([0 if i in special else len(self.encoding.decode_single_token_bytes(i))
                             for i in range(self.vocab_size)], dtype=torch.int32)

    def to_huggingface(self) -> tokenizers.Tokenizer:
        """The same tokenizer in Hugging Face's `tokenizers` (what tokenizer.json holds): the same ids for every
        text, special-token strings read as the special tokens (as `encode(text, special=True)`), no BOS added.

        tiktoken merges, within each piece the split pattern cuts, the adjacent pair whose concatenation has the
        lowest rank, and takes a piece that is a whole token at once. A BPE model does that when every way of
        cutting a token into two tokens is a merge, ranked by the token's rank (ignore_merges: whole tokens
        first); the bytes become characters as in GPT-2's byte-level BPE."""
        ranks, chars = self.encoding._mergeable_ranks, _byte_chars()

        def text(token: bytes) -> str:
            return "".join(chars[b] for b in token)

        merges = [(text(token[:i]), text(token[i:]))
                  for token, _ in sorted(ranks.items(), key=lambda kv: kv[1])
                  for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={text(t): rank for t, rank in ranks.items()},
                                                        merges=merges, ignore_merges=True))
        hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(self.encoding._pat_str), behavior="isolated"),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = tokenizers.decoders.ByteLevel()
        specials = sorted(self.encoding._special_tokens.items(), key=lambda kv: kv[1])
        hf.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False) for name, _ in specials])
        if [hf.token_to_id(name) for name, _ in specials] != [i for _, i in specials]:  # added after the vocab
            raise ValueError(f"special token ids {dict(specials)} do not follow the {len(ranks)} ordinary tokens")
        return hf

    def save(self, directory: str | os.PathLike) -> str:
        """Write the three files into `directory` (a local path or a URI of an object store), our config last:
        a reader that finds it finds the ranks and Hugging Face's tokenizer.json too. Each file is written
        atomically."""
        directory = str(directory)
        if "://" not in directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        ranks = self.encoding._mergeable_ranks
        lines = "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
        config = dict(pattern=self.encoding._pat_str, special_tokens=self.encoding._special_tokens,
                      vocab_size=self.vocab_size)
        write_bytes(join(directory, RANKS), lines)
        write_bytes(join(directory, HF_TOKENIZER), self.to_huggingface().to_str())
        write_bytes(join(directory, CONFIG), json.dumps(config, indent=2))
        return directory

    @staticmethod
    def is_saved(directory: str | os.PathLike) -> bool:
        """Whether `directory` holds a whole tokenizer in today's format (its config is written last)."""
        return exists(join(str(directory), CONFIG))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """The tokenizer saved in `directory` (a local path, or a URI such as s3://... of an object store); also
        one saved before nanoray_tokenizer.json, whose tokenizer.json is our config."""
        directory = str(directory)
        try:
            config, lines = _config(directory), read_bytes(join(directory, RANKS)).decode().splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory}: no tokenizer here (expected {CONFIG} and {RANKS}); "
                                    f"train one with: python -m nanoray.tokenizer train --out {directory}") from None
        ranks = {}
        for lineno, line in enumerate(lines, start=1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{join(directory, RANKS)}:{lineno}: expected '<base64> <rank>', got {line[:80]!r}") from e
        tokenizer = cls(tiktoken.Encoding(name="nanoray", pat_str=config["pattern"], mergeable_ranks=ranks,
                                          special_tokens=config["special_tokens"]))
        if tokenizer.vocab_size != config["vocab_size"]:
            raise ValueError(f"{directory}: {tokenizer.vocab_size} tokens on disk, {CONFIG} says {config['vocab_size']}")
        return tokenizer


def _config(directory: str) -> dict:
    """Our config: nanoray_tokenizer.json, or, in a folder saved before it existed, tokenizer.json holding it
    (Hugging Face's tokenizer.json has a "model", ours a "pattern"). FileNotFoundError when neither is there."""
    try:
        return json.loads(read_bytes(join(directory, CONFIG)))
    except FileNotFoundError:
        old = json.loads(read_bytes(join(directory, HF_TOKENIZER)))
        if "pattern" not in old:  # Hugging Face's, written before our config: a save that did not finish
            raise
        return old


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character. Printable Latin-1 bytes stand for
    themselves; the other 68 (controls, space, DEL, NBSP, soft hyphen) take the characters from U+0100 on."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    moved = iter(range(0x100, 0x200))
    return {b: chr(b) if b in printable else chr(next(moved)) for b in range(256)}


CHAT_ROLES = ("system", "user", "assistant")


def render_chat(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """nanochat's chat format, ending with <|assistant_start|> for the model to complete. A leading system
    message is merged into the first user message with a blank line."""
    if not messages:
        raise ValueError("messages: need at least one message")
    for i, m in enumerate(messages):
        if m.get("role") not in CHAT_ROLES or (m["role"] == "system" and i > 0):
            raise ValueError(f"messages[{i}].role: must be user or assistant (or system first), got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content: must be a string")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("messages[1].role: a system message must be followed by a user message")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged, *messages[2:]]
    special = tokenizer.encode_special
    ids = [tokenizer.bos_id]
    for m in messages:
        role = m["role"]
        ids += [special(f"<|{role}_start|>"), *tokenizer.encode(m["content"]), special(f"<|{role}_end|>")]
    return ids + [special("<|assistant_start|>")]


class TextStream:
    """Incremental detokenizer: feed(token) returns the text that is safe to show now (an incomplete UTF-8
    character is held back until its last byte arrives); flush() returns the rest."""

    def __init__(self, tokenizer: Tokenizer):
        self._token_bytes = tokenizer.encoding.decode_single_token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(self._token_bytes(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _capped(texts: Iterable[str], doc_cap: int, max_chars: int | None) -> Iterator[str]:
    total = 0
    for text in texts:
        text = text[:doc_cap]
        if max_chars is not None and total + len(text) > max_chars:
            return
        total += len(text)
        yield text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanoray.tokenizer", description="Train or convert a BPE tokenizer.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on a corpus source and save beside the data")
    t.add_argument("--source", default="stdlib", help="corpus source, e.g. stdlib, files:<glob>, parquet:<dir>")
    t.add_argument("--vocab-size", type=int, default=4096, help=f"tokens including specials (>= {MIN_VOCAB})")
    t.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
    t.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    t.add_argument("--out", required=True, help="output directory")
    c = sub.add_parser("convert", help="save a tokenizer folder again in today's format, with Hugging Face's "
                                       "tokenizer.json (for one saved before it, e.g. in an old checkpoint)")
    c.add_argument("directory", help="the tokenizer folder (a checkpoint's tokenizer/)")
    c.add_argument("--out", required=True, help="output directory (a checkpoint's own files are never rewritten)")
    args = p.parse_args(argv)
    try:
        if args.command == "convert":
            tokenizer = Tokenizer.load(args.directory)
        else:
            tokenizer = Tokenizer.train(read_source(args.source, split="train"), args.vocab_size,
                                        doc_cap=args.doc_cap, max_chars=args.max_chars)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    tokenizer.save(args.out)
    print(json.dumps(dict(out=str(args.out), vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id)))


if __name__ == "__main__":
    main()
