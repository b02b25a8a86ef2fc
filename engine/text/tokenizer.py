"""Qwen2 byte-level BPE tokenizer on the `tokenizers` library, read from a snapshot's tokenizer folder.

Two layouts exist on disk: `tokenizer.json` (saved by transformers 5 and recent 4.x) and `vocab.json` +
`merges.txt` + `tokenizer_config.json` (the published Qwen-Image-Edit snapshots). For the second we build
the same pipeline Qwen2Tokenizer builds: NFC normalizer, the Qwen split regex, byte-level mapping, BPE
with no unk token, and the added tokens of `added_tokens_decoder` at their ids. Added tokens are split
out of the raw text first, so a user typing "<|im_start|>" gets the special token, as transformers does.
"""
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from loaders import LoadError, read_json

_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _content(token):
    """A special-token entry of tokenizer_config.json: a string, a {"content": ...} dict, or None."""
    return token.get("content") if isinstance(token, dict) else token


def _build_bpe(folder, add_prefix_space):
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not vocab_path.is_file() or not merges_path.is_file():
        raise LoadError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt; re-download it")
    vocab = read_json(vocab_path)
    merges = []
    for line in merges_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise LoadError(f"{merges_path}: bad merge line {line!r}; re-download it")
        merges.append((pair[0], pair[1]))
    backend = Backend(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_config_tokens(backend, config, where):
    """Register `added_tokens_decoder` entries (id -> token) in id order and check each lands on its id."""
    table = config.get("added_tokens_decoder") or {}
    for token_id, entry in sorted(table.items(), key=lambda kv: int(kv[0])):
        token_id, content = int(token_id), entry["content"]
        if backend.token_to_id(content) == token_id:
            continue
        special = bool(entry.get("special", False))
        token = AddedToken(content, single_word=entry.get("single_word", False), lstrip=entry.get("lstrip", False),
                           rstrip=entry.get("rstrip", False), normalized=entry.get("normalized", not special),
                           special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
        if backend.token_to_id(content) != token_id:
            raise LoadError(f"{where}: added token {content!r} should have id {token_id} but got "
                            f"{backend.token_to_id(content)}; the tokenizer files do not match each other")


class Tokenizer:
    """encode(text) -> ids; pad(rows) -> (ids, mask) on the config's padding side."""

    def __init__(self, backend, pad_id, padding_side="right"):
        if padding_side not in ("left", "right"):
            raise LoadError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.backend, self.pad_id, self.padding_side = backend, pad_id, padding_side

    @classmethod
    def from_folder(cls, folder):
        """The folder's tokenizer; read once per process while its files stay the same (a CLI edit asks for it
        twice, to size the plan and to encode, and tokenizer.json takes ~0.65 s to parse)."""
        folder = Path(folder)
        stamp = []
        for name in _FILES:
            try:
                st = (folder / name).stat()
                stamp.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:
                pass
        return _from_folder(cls, str(folder.resolve()), tuple(stamp))

    @classmethod
    def _read(cls, folder):
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        if (folder / "tokenizer.json").is_file():
            try:
                backend = Backend.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises its own exception type for malformed files
                raise LoadError(f"cannot read {folder / 'tokenizer.json'}: {str(e).splitlines()[0]}") from None
        else:
            backend = _build_bpe(folder, bool(config.get("add_prefix_space") or False))
        _add_config_tokens(backend, config, config_path)
        pad = _content(config.get("pad_token")) or "<|endoftext|>"
        pad_id = backend.token_to_id(pad)
        if pad_id is None:
            raise LoadError(f"{config_path}: pad token {pad!r} is not in the vocabulary")
        return cls(backend, pad_id, config.get("padding_side", "right"))

    def token_id(self, token):
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise LoadError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def encode(self, text):
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids):
        return self.backend.decode(ids, skip_special_tokens=False)

    def pad(self, rows):
        """rows: list of id lists -> input_ids, attention_mask int64 [B, max_len], pads on padding_side."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for b, r in enumerate(rows):
            start = width - len(r) if self.padding_side == "left" else 0
            ids[b, start:start + len(r)] = torch.tensor(r, dtype=torch.int64)
            mask[b, start:start + len(r)] = 1
        return ids, mask

    def __repr__(self):
        return (f"Tokenizer(vocab={self.backend.get_vocab_size()}, pad_id={self.pad_id}, "
                f"padding_side={self.padding_side!r})")



@lru_cache(maxsize=4)
def _from_folder(cls, folder, stamp):       # stamp: the files' (name, size, mtime, inode): a rewrite misses
    return cls._read(folder)
