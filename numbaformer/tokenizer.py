"""GGUF vocabulary -> `tokenizers.Tokenizer` with llama.cpp's rules; token bytes; stream decoding.

The kind comes from `tokenizer.ggml.model`, as in llama.cpp's `llama_vocab::impl::load` (never from
the architecture):
- "gpt2": byte-level BPE. Text is split by the regexes llama.cpp lists for `tokenizer.ggml.pre`,
  applied one after the other (each splits every piece the previous left, keeping the gaps), then
  each piece is mapped through the GPT-2 byte table and merged by `tokenizer.ggml.merges` rank.
- "llama": SentencePiece BPE. Spaces become U+2581, one is prepended to every text fragment when
  `add_space_prefix`, the adjacent pair whose merged piece has the highest score merges first (the
  `tokenizers` BPE model gets the merges ranked by that score), and characters without a piece fall
  back to `<0xNN>` byte tokens.
Token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Control and unknown
tokens are matched in text only with `parse_special`; user-defined tokens always are (llama.cpp's
`tokenizer_st_partition`). Decoding concatenates each token's bytes (`token_bytes`), so streaming
and whole-sequence decoding agree byte for byte; llama.cpp's `clean_spaces` pass (" ," -> ",") is
not applied, so decode(encode(text)) == text.
"""
from __future__ import annotations

import codecs
import sys
import threading
from collections.abc import Iterable, Mapping
from itertools import repeat
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from .gguf_file import GGUFError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPM_SPACE = "\u2581"

# Pre-tokenizer regexes, verbatim from llama.cpp src/llama-vocab.cpp (llm_tokenizer_bpe).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEXES = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "smollm": (r"\p{N}", _GPT2),
}
# tokenizer.ggml.pre -> (regex set, ignore_merges and add_bos by default), as llama.cpp maps them.
_PRE_TYPES = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"), ("llama3", True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ("llama3", False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"),
                    ("qwen2", False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), ("smollm", False)),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), ("gpt2", False)),
    "default": ("default", False),
}

# Token texts llama.cpp treats as end of turn / end of message / FIM when the ids are not in the
# metadata, and the texts that end generation; all of these are forced to control type.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
              "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
              "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
              "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[")

_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id",
            "eom": "eom_token_id", "unk": "unknown_token_id", "pad": "padding_token_id",
            "fim_pad": "fim_pad_token_id", "fim_rep": "fim_rep_token_id",
            "fim_sep": "fim_sep_token_id"}
_SPM_DEFAULT_IDS = {"bos": 1, "eos": 2, "unk": 0}
_EOG_KEYS = ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep")
_CONTROL_TEXTS = sorted({*_EOT_TEXTS, *_EOM_TEXTS, *_FIM_PAD_TEXTS, *_FIM_REP_TEXTS,
                         *_FIM_SEP_TEXTS, *_EOG_TEXTS})
_MISSING = object()


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (byte b is stored in vocab pieces as table[b])."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _gpt2_byte_chars()
_UNBYTE = str.maketrans({c: b for b, c in enumerate(_BYTE_CHARS) if ord(c) >= 256})


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.ndim}-D array of {value.dtype}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return f"{type(value).__name__} {value!r}"[:80]


def _get(meta: Mapping[str, Any], key: str, kind: type | tuple, what: str, default=_MISSING):
    """meta['tokenizer.ggml.' + key] checked against `kind`; GGUFError naming the key otherwise."""
    full = f"tokenizer.ggml.{key}"
    if full not in meta:
        if default is _MISSING:
            raise GGUFError(f"key '{full}': missing (expected {what})")
        return default
    value = meta[full]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise GGUFError(f"key '{full}': expected {what}, found {_describe(value)}")
    return value


def _get_strings(meta: Mapping[str, Any], key: str) -> list[str]:
    value = _get(meta, key, list, "an array of strings")
    if not set(map(type, value)) <= {str}:
        raise GGUFError(f"key 'tokenizer.ggml.{key}': expected an array of strings, found "
                        f"other items")
    return value


def _get_numbers(meta: Mapping[str, Any], key: str, n: int, kinds: str) -> np.ndarray | None:
    value = _get(meta, key, (np.ndarray, list), f"a 1-D array of {n} numbers", None)
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.dtype.kind not in kinds or len(arr) != n:
        raise GGUFError(f"key 'tokenizer.ggml.{key}': expected a 1-D array of {n} numbers (one per "
                        f"token), found {arr.ndim}-D {arr.dtype} of length {arr.size}")
    return arr


def _find(index: Mapping[str, int], texts: Iterable[str]) -> list[int]:
    return [index[t] for t in texts if t in index]


def _read_pieces(meta) -> tuple[list[str], dict[str, int]]:
    """tokenizer.ggml.tokens (empty ones renamed "[EMPTY_i]" as llama.cpp) and piece -> id."""
    pieces = [p or f"[EMPTY_{i}]" for i, p in enumerate(_get_strings(meta, "tokens"))]
    index = {p: i for i, p in enumerate(pieces)}
    if len(index) != len(pieces):
        dup = next(p for i, p in enumerate(pieces) if index[p] != i)
        raise GGUFError(f"key 'tokenizer.ggml.tokens': expected distinct tokens, found {dup!r} "
                        f"twice")
    return pieces, index


def _read_types(meta, index: Mapping[str, int], n: int) -> np.ndarray:
    """tokenizer.ggml.token_type (all normal if absent), with llama.cpp's text heuristics: the
    end-of-turn/-generation and FIM texts are forced to control type."""
    types = _get_numbers(meta, "token_type", n, "iu")
    types = np.ones(n, np.int32) if types is None else types.astype(np.int32)
    types[_find(index, _CONTROL_TEXTS)] = CONTROL
    return types


def _check_add_flags(add_bos: bool, bos_id: int | None, add_eos: bool, eos_id: int | None) -> None:
    for flag, name, tid in ((add_bos, "bos", bos_id), (add_eos, "eos", eos_id)):
        if flag and tid is None:
            raise GGUFError(f"key 'tokenizer.ggml.add_{name}_token': is true, but "
                            f"'tokenizer.ggml.{name}_token_id' is not set")


def _special_ids(meta, index: Mapping[str, int], n: int, kind: str) -> dict[str, int | None]:
    """bos/eos/eot/... ids: metadata first, then llama.cpp's defaults and text heuristics."""
    ids = {name: _SPM_DEFAULT_IDS.get(name) if kind == "llama" else None for name in _ID_KEYS}
    ids = {name: i if i is not None and i < n else None for name, i in ids.items()}
    for name, key in _ID_KEYS.items():
        value = _get(meta, key, (int, np.integer), "a token id", None)
        if value is not None:
            value = int(value)
            if not 0 <= value < n:
                raise GGUFError(f"key 'tokenizer.ggml.{key}': expected a token id in [0, {n}), "
                                f"found {value}")
            ids[name] = value
    for name, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), ("fim_pad", _FIM_PAD_TEXTS),
                        ("fim_rep", _FIM_REP_TEXTS), ("fim_sep", _FIM_SEP_TEXTS)):
        if ids[name] is None:
            ids[name] = next(iter(_find(index, texts)), None)
    return ids


def _split_merge(merge: str) -> tuple[str, str]:
    cut = merge.find(" ", 1)         # llama.cpp splits at the first space after position 0
    return (merge[:cut], merge[cut + 1:]) if cut > 0 else ("", "")


def _bpe_merges(meta, index: Mapping[str, int]) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges ("left right", split at the first space after position 0), checked:
    both parts and their concatenation must be tokens. The loops run in C (map, set): a 128k vocab
    comes with 280k merges."""
    merges = _get_strings(meta, "merges")
    pairs = [(a, b) for a, _, b in map(str.partition, merges, repeat(" "))]
    if "" in (a for a, _ in pairs):          # a merge starting with a space: the slow, exact split
        pairs = list(map(_split_merge, merges))
    lefts, rights = [a for a, _ in pairs], [b for _, b in pairs]
    if not set(lefts) | set(rights) | set(map(str.__add__, lefts, rights)) <= index.keys():
        i = next(i for i, (a, b) in enumerate(pairs) if not {a, b, a + b} <= index.keys())
        raise GGUFError(f"key 'tokenizer.ggml.merges': expected 'left right' with both parts and "
                        f"their concatenation in the vocab, found {merges[i]!r} at index {i}")
    return pairs


def _spm_merges(pieces: list[str], scores: np.ndarray, index: Mapping[str, int]) -> list[tuple]:
    """Every (left, right) split of every piece into two pieces, ranked by the piece's score
    (highest first), as llama.cpp's SPM tokenizer picks the highest-scoring adjacent pair."""
    found = []
    for piece, score in zip(pieces, scores.tolist()):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                found.append((-score, index[left], index[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _pre_regexes(pre: str) -> tuple[tuple[str, ...], bool]:
    """The regex sequence and llama3-style flag for `pre`; unknown names get llama.cpp's default."""
    if pre not in _PRE_TYPES:
        print(f"numbaformer: unknown tokenizer.ggml.pre '{pre}', using the default pre-tokenizer; "
              f"tokenization may differ from the model's", file=sys.stderr)
    regex_set, llama3_like = _PRE_TYPES.get(pre, ("default", False))
    return _REGEXES[regex_set], llama3_like


def _build_hf(kind: str, pre: str, pieces: list[str], scores, index, meta, add_space_prefix: bool,
              unk: int | None) -> tuple[HFTokenizer, bool]:
    """The `tokenizers` pipeline for this vocab, without added tokens; also the add_bos default."""
    if kind == "gpt2":
        regexes, llama3_like = _pre_regexes(pre)
        tok = HFTokenizer(BPE(index, _bpe_merges(meta, index), ignore_merges=llama3_like))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        return tok, llama3_like
    if scores is None:
        scores = np.zeros(len(pieces), np.float32)
    unk_token = pieces[unk] if unk is not None else None
    tok = HFTokenizer(BPE(index, _spm_merges(pieces, scores, index), unk_token=unk_token,
                          byte_fallback=True, fuse_unk=True))
    norm = [normalizers.Replace(" ", SPM_SPACE)]
    dec = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend(SPM_SPACE))
        dec.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence(dec)
    return tok, True


def _piece_bytes(kind: str, piece: str, token_type: int) -> bytes:
    """The bytes a token stands for, as llama.cpp's token_to_piece(special=True) gives them."""
    if token_type == BYTE:
        return bytes([int(piece[3:5], 16)])
    if token_type in (CONTROL, UNKNOWN, USER_DEFINED):
        return piece.encode()
    if token_type != NORMAL:
        return b""
    if kind == "llama":
        return piece.replace(SPM_SPACE, " ").encode()
    plain = piece.translate(_UNBYTE)
    try:
        return plain.encode("latin-1")
    except UnicodeEncodeError:      # a character outside the byte table: kept as UTF-8
        return b"".join(c.encode("latin-1" if ord(c) < 256 else "utf-8") for c in plain)


class Tokenizer:
    """A GGUF vocabulary: encode/decode exactly as llama.cpp does (see the module docstring).

    Attributes: kind ("gpt2" | "llama"), pre, vocab_size, bos_id, eos_id, eot_id, pad_id, unk_id
    (int or None), add_bos, add_eos, add_space_prefix, eog_ids (frozenset of ids that end
    generation), hf (the underlying `tokenizers.Tokenizer`; its added tokens are the control,
    unknown and user-defined tokens).
    """

    def __init__(self, meta: Mapping[str, Any]):
        self.kind = _get(meta, "model", str, "a tokenizer model name")
        if self.kind not in ("gpt2", "llama"):
            raise GGUFError(f"key 'tokenizer.ggml.model': expected 'gpt2' or 'llama', found "
                            f"{self.kind!r}")
        self.pre = _get(meta, "pre", str, "a pre-tokenizer name", "default")
        pieces, index = _read_pieces(meta)
        self.vocab_size = n = len(pieces)
        types = _read_types(meta, index, n)
        ids = _special_ids(meta, index, n, self.kind)
        self.bos_id, self.eos_id, self.eot_id = ids["bos"], ids["eos"], ids["eot"]
        self.eom_id, self.pad_id, self.unk_id = ids["eom"], ids["pad"], ids["unk"]
        eog = (*_find(index, _EOG_TEXTS), *(ids[k] for k in _EOG_KEYS))
        self.eog_ids = frozenset(i for i in eog if i is not None)
        self.add_space_prefix = self.kind == "llama" and _get(
            meta, "add_space_prefix", bool, "a bool", True)
        self.hf, bos_default = _build_hf(self.kind, self.pre, pieces, _get_numbers(
            meta, "scores", n, "fiu"), index, meta, self.add_space_prefix, self.unk_id)
        self.add_bos = _get(meta, "add_bos_token", bool, "a bool", bos_default)
        self.add_eos = _get(meta, "add_eos_token", bool, "a bool", False)
        _check_add_flags(self.add_bos, self.bos_id, self.add_eos, self.eos_id)
        self._pieces, self._types = pieces, types.tolist()
        self._special = np.isin(types, (CONTROL, UNKNOWN)).tolist()    # hidden by skip_special
        fragment_end = np.isin(types, (CONTROL, UNKNOWN, USER_DEFINED))
        self._fragment_end = fragment_end.tolist()                     # encode splits text here
        self._bytes: list[bytes | None] = [None] * n                   # filled on first use
        self.hf.add_tokens([AddedToken(pieces[i], special=self._special[i], normalized=False)
                            for i in np.flatnonzero(fragment_end).tolist()])
        self._lock = threading.Lock()

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "") -> Tokenizer:
        """Build from GGUF metadata (`open_gguf(path).metadata`); errors are GGUFError, prefixed
        with `source` (e.g. the file name) when given."""
        try:
            return cls(meta)
        except GGUFError as e:
            if source:
                raise GGUFError(f"{source}: {e}") from None
            raise

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. add_special: BOS/EOS per add_bos/add_eos (never doubled when the
        text already starts with BOS / ends with EOS). parse_special: match control tokens such as
        `<|im_start|>` in the text; user-defined tokens are matched either way (as llama.cpp)."""
        with self._lock:      # encode_special_tokens is state of the shared hf tokenizer
            self.hf.encode_special_tokens = not parse_special
            ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        if add_special and self.add_eos and ids[-1:] != [self.eos_id]:
            ids.append(self.eos_id)
        return ids

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocab [0, {self.vocab_size})")
        return token_id

    def piece(self, token_id: int) -> str:
        """The vocab string of a token (as stored: byte-level characters, U+2581, `<0xNN>`)."""
        return self._pieces[self._check(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (control/user-defined tokens: their text)."""
        data = self._bytes[self._check(token_id)]
        if data is None:
            data = self._bytes[token_id] = _piece_bytes(self.kind, self._pieces[token_id],
                                                        self._types[token_id])
        return data

    def token_text(self, token_id: int) -> str:
        """The text a token stands for, readable: its bytes as UTF-8, a byte that is only part of
        a character as `\\xNN` (piece() is the raw vocab string: 'Ġworld' -> ' world')."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def is_special(self, token_id: int) -> bool:
        """True for control and unknown tokens: the ones decode(skip_special=True) leaves out."""
        return self._special[self._check(token_id)]

    def text_bytes(self, token_id: int, prev_id: int | None, skip_special: bool = False) -> bytes:
        """The bytes `token_id` adds to decoded text after `prev_id` (None: start of the text).

        SPM with add_space_prefix: encode prepends a space to the text at the start and after each
        special token (control, unknown, user-defined), so the first token after those loses one
        leading space here.
        """
        data = self.token_bytes(token_id)
        if skip_special and self._special[token_id]:
            return b""
        if (self.add_space_prefix and data[:1] == b" " and not self._fragment_end[token_id]
                and (prev_id is None or self._fragment_end[self._check(prev_id)])):
            return data[1:]
        return data

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`: token bytes joined, invalid UTF-8 replaced by U+FFFD. skip_special leaves
        out control/unknown tokens. SPM: see text_bytes for the leading-space rule."""
        ids = list(ids)
        prev = [None, *ids[:-1]]
        data = b"".join(self.text_bytes(i, p, skip_special) for i, p in zip(ids, prev))
        return data.decode("utf-8", errors="replace")


class StreamDecoder:
    """Incremental detokenizer: push(id) returns the text that became complete, holding back an
    unfinished UTF-8 sequence; flush() returns the rest (bad bytes as U+FFFD). Pushing `ids` then
    flushing gives decode(context + ids) minus decode(context), where prev_id = context[-1] (the
    prompt's last token, say) and context ends on a character boundary; prev_id None means the
    stream starts the text, as decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False,
                 prev_id: int | None = None):
        self._tok, self._skip, self._prev = tokenizer, skip_special, prev_id
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        data = self._tok.text_bytes(token_id, self._prev, self._skip)
        self._prev = token_id
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Return what is held back, incomplete sequences as U+FFFD; the decoder is then empty."""
        return self._utf8.decode(b"", final=True)
