"""`numbaformer models` and `models rm NAME` (numbaformer/catalog.py): the model cache
(NUMBAFORMER_CACHE) and the hub's cache (HF_HOME), filled from the local test hub (fixture `hub`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from cli_helpers import assert_one_line_error, cli
from gguf_builder import GGUFBuilder
from hub_server import TINY_REPO
from vocab_files import unpack_vocab

from numbaformer import catalog, hub as hubmod

Q4, Q8 = f"{TINY_REPO}:Q4_K_M", f"{TINY_REPO}:Q8_0"


def listing(hub) -> dict[str, dict]:
    r = cli("models", "--json", env=hub.env)
    assert r.code == 0 and r.err == "", r.err
    return {row["name"]: row for row in json.loads(r.out)}


def pull(hub, *refs):
    for ref in refs:
        r = cli("info", "-hf", ref, "--json", env=hub.env)
        assert r.code == 0, r.err


def test_empty_caches(hub):
    r = cli("models", env=hub.env)
    assert r.code == 0 and r.out.startswith("no models in the caches ("), r.out
    assert listing(hub) == {}


def test_lists_both_caches(hub, tmp_path):
    pull(hub, Q4, Q8)
    mine = Path(hub.env["NUMBAFORMER_CACHE"])
    mine.mkdir()
    shutil.copy(next(hub.cache.rglob("tiny-Q8_0.gguf")), mine / "local.gguf")
    rows = listing(hub)
    assert set(rows) == {"local.gguf", Q4, Q8}
    q4 = rows[Q4]
    data = hub.server.repos[TINY_REPO].files["tiny-Q4_K_M.gguf"]
    assert (q4["size_bytes"], q4["architecture"], q4["type"], q4["source"]) == \
        (len(data), "llama", "Q4_K_M", "hub")
    assert Path(q4["path"]).read_bytes() == data
    assert rows["local.gguf"]["source"] == "numbaformer" and rows["local.gguf"]["type"] == "Q8_0"
    table = cli("models", env=hub.env).out.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "ARCH", "TYPE", "PATH"]
    assert any(line.split()[0] == Q8 and "Q8_0" in line.split() for line in table[1:])


def test_rm_one_quant_then_the_repository(hub):
    pull(hub, Q4, Q8)
    blobs = hub.cache / "models--test-org--tiny-GGUF" / "blobs"
    assert len(list(blobs.iterdir())) == 2
    r = cli("models", "rm", f"{TINY_REPO}:q8_0", env=hub.env)
    assert r.code == 0 and r.out.startswith(f"removed {Q8} ("), r.err
    assert set(listing(hub)) == {Q4} and len(list(blobs.iterdir())) == 1
    r = cli("info", "-hf", TINY_REPO, "--offline", "--json", env=hub.env)   # still usable
    assert r.code == 0 and json.loads(r.out)["file_type"] == "Q4_K_M", r.err
    r = cli("models", "rm", TINY_REPO, env=hub.env)                        # all that is left
    assert r.code == 0 and r.out.startswith(f"removed {Q4} ("), r.err
    assert listing(hub) == {} and not (hub.cache / "models--test-org--tiny-GGUF").exists()


def test_model_cache_files_of_every_kind_and_rm(hub, tmp_path):
    mine = Path(hub.env["NUMBAFORMER_CACHE"])
    mine.mkdir()
    (mine / "a.gguf").write_bytes(b"GGUF")
    shutil.copy(unpack_vocab("llama-spm", tmp_path), mine / "vocab.gguf")
    (mine / "empty.gguf").write_bytes(GGUFBuilder().to_bytes())            # no keys, no tensors
    rows = listing(hub)
    assert rows["a.gguf"]["type"] == "invalid"              # listed, though not a valid GGUF
    assert (rows["vocab.gguf"]["type"], rows["vocab.gguf"]["architecture"]) == \
        ("vocab-only", "llama")
    assert (rows["empty.gguf"]["type"], rows["empty.gguf"]["architecture"]) == ("?", "?")
    assert cli("models", "rm", "a.gguf", env=hub.env).code == 0
    assert not (mine / "a.gguf").exists()


def test_rm_unknown_name(hub):
    pull(hub, Q8)
    assert_one_line_error(cli("models", "rm", "nothing", env=hub.env),
                          "no model 'nothing' in the caches", f"(there are: {Q8})")


def test_names_when_a_quant_is_ambiguous():
    """Two files of one quant, or a file in an older revision: ORG/REPO/FILE, @COMMIT for the
    older revision."""
    def f(name, commit, modified):
        p = Path("/c") / commit / name
        return hubmod.CachedFile("o/r", name, p, p, commit, 1, modified)
    files = [f("m-Q8_0.gguf", "b" * 40, 2.0), f("sub/m-Q8_0.gguf", "b" * 40, 2.0),
             f("m-Q4_0.gguf", "b" * 40, 2.0), f("m.gguf", "b" * 40, 2.0),
             f("m-Q8_0.gguf", "a" * 40, 1.0)]
    assert catalog._hub_names(files) == ["o/r/m-Q8_0.gguf", "o/r/sub/m-Q8_0.gguf", "o/r:Q4_0",
                                         "o/r/m.gguf", "o/r/m-Q8_0.gguf@aaaaaaa"]
