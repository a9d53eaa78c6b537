"""numbaformer.tokenizer against llama.cpp: its tokenizer test vectors, SmolLM2's reference prompt
ids, special-token and BOS rules, end-of-generation ids, streaming decode, metadata errors."""
import json
import random

import numpy as np
import pytest
from vocab_files import VECTOR_SETS, data_path, read_metadata, read_vectors, unpack_vocab

from numbaformer.gguf_file import GGUFError
from numbaformer.tokenizer import StreamDecoder, Tokenizer

# mixes characters that byte-level and byte-fallback vocabs split over several tokens
MULTIBYTE = "🦙 日本語の文 ✅ Cửa Việt 😶\u200d🌫️ нещо 🚀!"


@pytest.fixture(scope="session")
def vocab(tmp_path_factory):
    """vocab(name) -> (metadata, Tokenizer) for a llama.cpp vector set, unpacked and built once."""
    folder, cache = tmp_path_factory.mktemp("vocab"), {}

    def load(name):
        if name not in cache:
            meta = read_metadata(unpack_vocab(name, folder))
            cache[name] = meta, Tokenizer.from_metadata(meta, source=name)
        return cache[name]

    return load


def gpt2_byte_chars():
    """GPT-2's bytes_to_unicode (openai/gpt-2 encoder.py): byte b -> its character in pieces."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs)))
    return [table[b] for b in range(256)]


def tiny_gpt2_meta(**changes):
    """A byte-level BPE vocab: the 256 byte characters, 'Ġt', 'he', 'Ġthe', '<|endoftext|>'."""
    tokens = [*gpt2_byte_chars(), "Ġt", "he", "Ġthe", "<|endoftext|>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
            "tokenizer.ggml.eos_token_id": 259}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


@pytest.mark.parametrize("name", VECTOR_SETS)
def test_encode_matches_llama_cpp_vectors(vocab, name):
    _, tok = vocab(name)
    cases = read_vectors(name)
    assert len(cases) == 46
    wrong = [(text, ids) for text, ids in cases
             if tok.encode(text, add_special=False, parse_special=False) != ids]
    assert wrong == []


@pytest.mark.parametrize("name", VECTOR_SETS)
def test_decode_round_trips(vocab, name):
    """decode(encode(x)) == x exactly, for byte-level BPE and for SPM: SPM's encode prepends one
    space to each text fragment (add_space_prefix), and decode drops exactly that space again
    from the first token of a fragment. The raw token bytes do carry it."""
    _, tok = vocab(name)
    for text, _ in read_vectors(name):
        ids = tok.encode(text, add_special=False, parse_special=False)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text), skip_special=True) == text
        raw = b"".join(tok.token_bytes(i) for i in ids)
        prefix = b" " if tok.kind == "llama" and text else b""
        assert raw == prefix + text.encode()


@pytest.mark.parametrize("name", VECTOR_SETS)
def test_hf_decoder_agrees_with_decode(vocab, name):
    _, tok = vocab(name)
    for text, ids in read_vectors(name):
        assert tok.hf.decode(ids, skip_special_tokens=False) == tok.decode(ids) == text


def test_kinds_and_flags_follow_tokenizer_model_and_pre(vocab):
    expect = {"llama-spm": ("llama", True, 1, 2), "llama-bpe": ("gpt2", True, 128000, 128001),
              "qwen2": ("gpt2", False, 151643, 151643), "gpt-2": ("gpt2", False, 50256, 50256)}
    for name, (kind, add_bos, bos, eos) in expect.items():
        _, tok = vocab(name)
        assert (tok.kind, tok.add_bos, tok.bos_id, tok.eos_id, tok.add_eos) == (kind, add_bos, bos,
                                                                                 eos, False)
    assert vocab("llama-spm")[1].unk_id == 0 and vocab("qwen2")[1].unk_id is None
    assert vocab("qwen2")[1].pad_id == 151643


def test_special_tokens_parsed_only_with_parse_special(vocab):
    _, tok = vocab("qwen2")
    text = "<|im_start|>user\nhi<|im_end|>"
    parsed = tok.encode(text, parse_special=True)
    assert parsed[0] == 151644 and parsed[-1] == 151645
    assert tok.decode(parsed) == text
    plain = tok.encode(text, parse_special=False)
    assert 151644 not in plain and 151645 not in plain and len(plain) > len(parsed) + 4
    assert tok.decode(plain) == text


def test_user_defined_tokens_are_matched_either_way(vocab):
    _, tok = vocab("qwen2")
    for parse_special in (True, False):
        ids = tok.encode("a[PAD151646]b", parse_special=parse_special)
        assert 151646 in ids
    assert not tok.is_special(151646) and tok.is_special(151644)
    assert tok.decode([151646], skip_special=True) == "[PAD151646]"


def test_spm_bos_added_once_and_space_prefix_per_fragment(vocab):
    _, tok = vocab("llama-spm")
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.encode("Hello world", add_special=False) == [15043, 3186]
    assert tok.encode("<s>Hello world") == [1, 15043, 3186]               # no double BOS
    assert tok.encode("<s>Hello world", parse_special=False)[:2] == [1, 529]  # '<s>' as text
    ids = tok.encode("Hello</s> world")   # ' world' after </s> gets a prefix: '▁' '▁world'
    assert ids == [1, 15043, 2, 29871, 3186]
    assert tok.decode(ids) == "<s>Hello</s> world"
    assert tok.decode(ids, skip_special=True) == "Hello world"


def test_bos_eos_flags_from_metadata(vocab):
    meta, _ = vocab("llama-spm")
    no_bos = Tokenizer.from_metadata({**meta, "tokenizer.ggml.add_bos_token": False})
    assert no_bos.encode("Hello") == [15043]
    with_eos = Tokenizer.from_metadata({**meta, "tokenizer.ggml.add_eos_token": True})
    assert with_eos.encode("Hello") == [1, 15043, 2]
    assert with_eos.encode("Hello</s>") == [1, 15043, 2]                  # no double EOS
    bpe = vocab("llama-bpe")[1]                         # llama3 pre: BOS by default
    assert bpe.encode("Hi")[0] == 128000
    assert bpe.encode("<|begin_of_text|>Hi") == bpe.encode("Hi")
    assert vocab("qwen2")[1].encode("Hi") == vocab("qwen2")[1].encode("Hi", add_special=False)


def test_eog_ids_follow_llama_cpp(vocab):
    assert vocab("llama-spm")[1].eog_ids == {2}
    assert vocab("gpt-2")[1].eog_ids == {50256}
    bpe = vocab("llama-bpe")[1]
    assert bpe.eot_id == 128009 and bpe.eog_ids == {128001, 128009}
    qwen = vocab("qwen2")[1]
    # '<|endoftext|>', '<|im_end|>', and '</s>' (a plain token there, but on llama.cpp's EOG list)
    assert qwen.eot_id == 151645 and qwen.eog_ids == {151643, 151645, 128247}
    assert qwen.piece(128247) == "</s>"
    meta, _ = vocab("llama-spm")
    tok = Tokenizer.from_metadata({**meta, "tokenizer.ggml.eot_token_id": 13})
    assert tok.eot_id == 13 and tok.eog_ids == {2, 13}


def test_token_bytes_piece_and_specials(vocab):
    spm = vocab("llama-spm")[1]
    assert (spm.piece(13), spm.token_bytes(13)) == ("<0x0A>", b"\n")
    assert (spm.piece(15043), spm.token_bytes(15043)) == ("▁Hello", b" Hello")
    assert spm.is_special(1) and spm.is_special(0) and not spm.is_special(15043)
    gpt2 = vocab("gpt-2")[1]
    the = gpt2.encode(" the", add_special=False)
    assert len(the) == 1 and gpt2.piece(the[0]) == "Ġthe" and gpt2.token_bytes(the[0]) == b" the"
    # token_text: readable; a byte that is only part of a character as \xNN
    assert [spm.token_text(i) for i in (13, 15043, 1)] == ["\n", " Hello", "<s>"]
    assert spm.token_text(3 + 0xE9) == "\\xe9" and spm.piece(3 + 0xE9) == "<0xE9>"
    assert gpt2.token_text(the[0]) == " the"
    for bad in (-1, spm.vocab_size):
        with pytest.raises(ValueError, match="outside the vocab"):
            spm.token_bytes(bad)
        with pytest.raises(ValueError, match="outside the vocab"):
            spm.decode([15043, bad])


@pytest.mark.parametrize("name", VECTOR_SETS)
def test_stream_decoder_never_splits_a_character(vocab, name):
    _, tok = vocab(name)
    ids = tok.encode(MULTIBYTE, add_special=False)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" and tok.token_bytes(i) for p, i in zip(pieces, ids))  # bytes held back
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == MULTIBYTE


def test_stream_decoder_matches_decode_on_arbitrary_ids(vocab):
    """Random mixes of byte tokens (broken UTF-8 included), text and special tokens."""
    for name, pool in (("llama-spm", [*range(3, 259), 1, 2, 15043, 29871, 3186]),
                       ("qwen2", [*range(0, 256), 151644, 151646, 100000])):
        _, tok = vocab(name)
        rng = random.Random(0)
        for _ in range(300):
            ids = [rng.choice(pool) for _ in range(rng.randint(0, 12))]
            for skip in (False, True):
                stream = StreamDecoder(tok, skip_special=skip)
                text = "".join(stream.push(i) for i in ids) + stream.flush()
                assert text == tok.decode(ids, skip_special=skip)


def test_stream_decoder_continues_a_prompt(vocab):
    """SPM: with prev_id = the prompt's last token, the streamed text is what decode(prompt +
    generated) adds to decode(prompt): the leading space of ' world' is kept, after BOS not."""
    _, tok = vocab("llama-spm")
    prompt, generated = tok.encode("Hello"), tok.encode(" world 🦙", add_special=False)[1:]
    stream = StreamDecoder(tok, prev_id=prompt[-1])
    text = "".join(stream.push(i) for i in generated) + stream.flush()
    assert text == tok.decode(prompt + generated)[len(tok.decode(prompt)):] == " world 🦙"
    after_bos = StreamDecoder(tok, prev_id=1)
    assert after_bos.push(15043) == "Hello"


def test_tiny_gpt2_vocab_defaults_and_heuristics():
    tok = Tokenizer.from_metadata(tiny_gpt2_meta())
    assert tok.encode(" the the") == [258, 258]
    assert tok.bos_id is None and not tok.add_bos and tok.unk_id is None
    assert tok.eog_ids == {259} and tok.is_special(259)   # '<|endoftext|>' forced to control
    assert tok.encode("x<|endoftext|>") == [ord("x"), 259]


@pytest.mark.parametrize("pre, ids", [
    ("gpt-2", [260, ord("2")]),                      # ' 12' one piece: 'Ġ1' '2'
    ("smollm", [32, ord("1"), ord("2")]),            # \p{N} split before the GPT-2 regex
    ("qwen2", [32, ord("1"), ord("2")]),             # \p{N}: one digit per piece
    ("llama-bpe", [32, 261]),                        # \p{N}{1,3}: ' ' '12'
    ("default", [32, 261]),                          # \p{N}+ after the GPT-2 regex
])
def test_pre_tokenizer_regexes_by_pre_name(pre, ids):
    """' 12' with merges 'Ġ 1' (rank 3) and '1 2' (rank 4): the split decides which can apply.
    (Byte b is token id b in the tiny vocab, so the space 'Ġ' is id 32.)"""
    meta = tiny_gpt2_meta(**{"tokenizer.ggml.pre": pre, "tokenizer.ggml.bos_token_id": 259})
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], "Ġ1", "12"]
    meta["tokenizer.ggml.merges"] = [*meta["tokenizer.ggml.merges"], "Ġ 1", "1 2"]
    assert Tokenizer.from_metadata(meta).encode(" 12", add_special=False) == ids


def test_llama3_pre_ignores_merges_for_whole_words():
    """llama.cpp's ignore_merges (llama3 pre): a pre-token that is itself a token is taken whole."""
    meta = tiny_gpt2_meta(**{"tokenizer.ggml.merges": ["Ġ t", "h e"]})   # no 'Ġt he'
    assert Tokenizer.from_metadata(meta).encode(" the") == [256, 257]
    meta["tokenizer.ggml.pre"] = "llama-bpe"
    meta["tokenizer.ggml.bos_token_id"] = 259
    assert Tokenizer.from_metadata(meta).encode(" the", add_special=False) == [258]


def test_unknown_pre_uses_llama_cpp_default(capsys):
    tok = Tokenizer.from_metadata(tiny_gpt2_meta(**{"tokenizer.ggml.pre": "no-such-pre"}))
    assert "unknown tokenizer.ggml.pre 'no-such-pre'" in capsys.readouterr().err
    assert tok.encode(" the the") == [258, 258]
    assert tok.encode("1234", add_special=False) == [ord(c) for c in "1234"]


def _spm_bad(meta, key, value):
    """meta with `key` set to value, or removed when value is None."""
    changed = {**meta, key: value}
    return changed if value is not None else {k: v for k, v in changed.items() if k != key}


@pytest.mark.parametrize("key, value, words", [
    ("tokenizer.ggml.model", None, "missing"),
    ("tokenizer.ggml.model", "bert", "expected 'gpt2' or 'llama'"),
    ("tokenizer.ggml.model", 3, "found int"),
    ("tokenizer.ggml.tokens", "abc", "array of strings"),
    ("tokenizer.ggml.tokens", None, "missing"),
    ("tokenizer.ggml.scores", np.zeros(5, np.float32), "length 5"),
    ("tokenizer.ggml.token_type", np.ones(31999, np.int32), "length 31999"),
    ("tokenizer.ggml.token_type", np.ones(32000, np.float32), "float32"),
    ("tokenizer.ggml.bos_token_id", 32000, "[0, 32000)"),
    ("tokenizer.ggml.unknown_token_id", -1, "[0, 32000)"),
    ("tokenizer.ggml.eos_token_id", "2", "found str"),
    ("tokenizer.ggml.add_bos_token", 1, "a bool"),
    ("tokenizer.ggml.pre", ["default"], "pre-tokenizer name"),
])
def test_bad_spm_metadata_raises_gguf_error(vocab, key, value, words):
    meta, _ = vocab("llama-spm")
    with pytest.raises(GGUFError) as err:
        Tokenizer.from_metadata(_spm_bad(meta, key, value), source="m.gguf")
    message = str(err.value)
    assert message.startswith("m.gguf: ") and key in message and words in message
    assert "\n" not in message


def test_duplicate_tokens_raise_gguf_error(vocab):
    meta, _ = vocab("llama-spm")
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[300] = tokens[301]
    with pytest.raises(GGUFError, match="tokenizer.ggml.tokens.*twice"):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.tokens": tokens})


@pytest.mark.parametrize("changes, words", [
    ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges': missing"),
    ({"tokenizer.ggml.merges": ["Ġ t", "h zz"]}, "'h zz' at index 1"),
    ({"tokenizer.ggml.merges": ["Ġt"]}, "'Ġt' at index 0"),
    ({"tokenizer.ggml.add_bos_token": True}, "bos_token_id' is not set"),
    ({"tokenizer.ggml.eos_token_id": 2**32 - 1}, "eos_token_id"),
])
def test_bad_bpe_metadata_raises_gguf_error(changes, words):
    with pytest.raises(GGUFError) as err:
        Tokenizer.from_metadata(tiny_gpt2_meta(**changes))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_smollm2_prompt_ids_match_llama_cpp(smollm2_path):
    meta = read_metadata(smollm2_path)
    tok = Tokenizer.from_metadata(meta)
    assert (tok.kind, tok.pre, tok.add_bos) == ("gpt2", "smollm", False)
    prompts = json.loads(data_path("reference/prompts.json").read_text())
    ref = json.loads(data_path("reference/smollm2-135m-q4_1.llamacpp.json").read_text())
    assert [r["prompt"] for r in ref["results"]] == prompts
    for r in ref["results"]:
        assert tok.encode(r["prompt"], add_special=True, parse_special=True) == r["prompt_ids"]
        assert tok.decode(r["greedy_ids"]) == r["greedy_text"]
    # eos '<|im_end|>', '<|endoftext|>', and '<reponame>' (llama.cpp's FIM-repo text heuristic)
    assert tok.eot_id == 2 and tok.eog_ids == {0, 2, 4}
