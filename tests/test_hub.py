"""Models by name from the Hugging Face hub (numbaformer/hub.py, `-hf`): the real huggingface_hub
client against the local test hub (tests/hub_server.py, fixtures `hub_server` and `hub` in
conftest.py): picking the file, downloading into the hub's cache, verifying it, the errors, the
cache when offline or unreachable, HF_TOKEN, and generation from the pulled model."""
from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, cli, run_process
from hub_server import TINY_REPO

from numbaformer import hub as hubmod

GEN = ("-p", "the cat", "-n", 2, "--temp", 0, "--device", "cpu", "-c", 32)


def info(hub, *args, env=None):
    """`numbaformer info ARGS --json` against the test hub: (result, the JSON or None)."""
    r = cli("info", *args, "--json", env={**hub.env, **(env or {})})
    return r, (json.loads(r.out) if r.code == 0 else None)


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def downloads(hub) -> list[str]:
    """The file names the test hub sent (GET .../resolve/...) since the test began."""
    return [Path(p).name for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]


# --- references and picking a file (no hub) -------------------------------------------------------

@pytest.mark.parametrize("text,repo,quant", [
    ("org/repo", "org/repo", None), ("org/repo:q8_0", "org/repo", "Q8_0"),
    ("hf://org/repo:Q4_K_M", "org/repo", "Q4_K_M"), ("hf.co/org/re.po-x_1", "org/re.po-x_1", None),
    ("https://huggingface.co/org/repo:IQ4_XS", "org/repo", "IQ4_XS")])
def test_parse_ref(text, repo, quant):
    assert hubmod.parse_ref(text) == hubmod.HubRef(repo, quant)


@pytest.mark.parametrize("text", ["repo", "org/repo/x", "org/repo:", "org/repo:Q8 0", "/repo",
                                  "org/../x", "org/re--po", ""])
def test_parse_ref_refuses(text):
    with pytest.raises(hubmod.HubError, match="ORG/REPO"):
        hubmod.parse_ref(text)


def test_hub_ref_tells_files_from_repositories(tmp_path):
    f = tmp_path / "org"
    f.mkdir()
    (f / "model").write_bytes(b"x")
    assert hubmod.hub_ref("org/repo:Q8_0") == hubmod.HubRef("org/repo", "Q8_0")
    assert hubmod.hub_ref("hf://org/repo.gguf") == hubmod.HubRef("org/repo.gguf")
    assert hubmod.hub_ref(str(f / "model")) is None                  # an existing file
    assert hubmod.hub_ref("models/x.gguf") is None                   # a .gguf path
    assert hubmod.hub_ref("a/b/c") is None and hubmod.hub_ref("model") is None


@pytest.mark.parametrize("name,quant", [
    ("tiny-Q4_K_M.gguf", "Q4_K_M"), ("Llama-3.2-1B-Instruct-q8_0.gguf", "Q8_0"),
    ("Qwen2.5-0.5B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
    ("m-UD-Q4_K_XL-00001-of-00002.gguf", "Q4_K_XL"),
    ("sub/model.F16.gguf", "F16"), ("model-bf16.gguf", "BF16"), ("model.gguf", None),
    ("Qwen2-7B.gguf", None), ("m_Q4_K_M_imatrix.gguf", "Q4_K_M"), ("m-Q4_0_4_8.gguf", "Q4_0_4_8"),
    ("gpt-oss-20b-MXFP4.gguf", "MXFP4"), ("m-IQ2_XXS.gguf", "IQ2_XXS"), ("m-Q6_K.gguf", "Q6_K")])
def test_quant_of(name, quant):
    assert hubmod.quant_of(name) == quant


def test_choose():
    names = ["m-Q8_0.gguf", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "README.md", "mmproj-m-F16.gguf"]
    assert hubmod.choose("o/r", None, names) == "m-Q4_K_M.gguf"
    assert hubmod.choose("o/r", "Q8_0", names) == "m-Q8_0.gguf"
    assert hubmod.choose("o/r", "Q4_K_S", names) == "m-Q4_K_S.gguf"
    assert hubmod.choose("o/r", None, ["b-Q8_0.gguf", "a-Q6_K.gguf", "mmproj-a.gguf"]) == \
        "a-Q6_K.gguf"                             # no Q4_K_M: the first GGUF by name
    with pytest.raises(hubmod.HubError, match=r"no GGUF file for quant Q4_K; it has: Q4_K_M, "
                                              r"Q4_K_S, Q8_0$"):
        hubmod.choose("o/r", "Q4_K", names)
    with pytest.raises(hubmod.HubError, match="holds no GGUF model file"):
        hubmod.choose("o/r", None, ["README.md", "mmproj-x.gguf"])
    with pytest.raises(hubmod.HubError, match="split into 3 files"):
        hubmod.choose("o/r", "Q8_0", [f"m-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)])


# --- pulling from the test hub --------------------------------------------------------------------

def test_default_quant_is_downloaded_into_the_hubs_cache_and_verified(hub):
    r, d = info(hub, "-hf", TINY_REPO)
    assert r.code == 0 and r.err == "", r.err            # no notes, no bar (not a terminal)
    assert d["file_type"] == "Q4_K_M"
    path = Path(d["path"])
    commit = hub.server.repos[TINY_REPO].commit
    assert path == hub.cache / "models--test-org--tiny-GGUF" / "snapshots" / commit / \
        "tiny-Q4_K_M.gguf"
    data = hub.server.repos[TINY_REPO].files["tiny-Q4_K_M.gguf"]
    assert path.read_bytes() == data
    assert path.resolve().name == hashlib.sha256(data).hexdigest()     # the blob, by its sha256
    assert [m for m, p, _ in hub.requests] == ["GET", "HEAD", "GET"]   # info, metadata, bytes
    assert downloads(hub) == ["tiny-Q4_K_M.gguf"]


def test_quant_pick_is_case_insensitive_and_m_takes_the_same_string(hub):
    r, d = info(hub, "-hf", f"{TINY_REPO}:q8_0")
    assert r.code == 0, r.err
    assert d["file_type"] == "Q8_0" and d["path"].endswith("tiny-Q8_0.gguf")
    for model in (f"{TINY_REPO}:Q8_0", f"hf://{TINY_REPO}:Q8_0"):
        r, d2 = info(hub, model)                               # info's MODEL argument, as -m
        assert r.code == 0 and d2["path"] == d["path"], r.err
    assert downloads(hub) == ["tiny-Q8_0.gguf"]                # once; then from the cache


def test_a_projector_is_never_the_default(hub):
    r, d = info(hub, "-hf", "test-org/vision-GGUF")
    assert r.code == 0 and d["path"].endswith("tiny-Q8_0.gguf"), r.err


@pytest.mark.parametrize("ref,fragments", [
    (f"{TINY_REPO}:Q5_K_M", ("has no GGUF file for quant Q5_K_M", "it has: Q4_K_M, Q8_0")),
    ("test-org/no-gguf", ("test-org/no-gguf holds no GGUF model file",)),
    ("test-org/split-GGUF", ("split into 2 files", "not supported")),
    ("test-org/no-such-repo", ("test-org/no-such-repo: no such repository on http://127.0.0.1",
                               "HF_TOKEN")),
    ("test-org/private-GGUF", ("no such repository", "HF_TOKEN")),
    ("not-a-repo", ("expected ORG/REPO",)),
])
def test_errors_are_one_line(hub, ref, fragments):
    assert_one_line_error(cli("info", "-hf", ref, env=hub.env), *fragments)
    assert downloads(hub) == []


def test_hf_token_is_sent(hub):
    r, d = info(hub, "-hf", "test-org/private-GGUF", env={"HF_TOKEN": "hf_secret"})
    assert r.code == 0, r.err
    assert {auth for _, _, auth in hub.requests} == {"Bearer hf_secret"}


def test_m_and_hf_together(hub, tmp_path):
    r = cli("tokenize", "-m", "x.gguf", "-hf", TINY_REPO, "hi", env=hub.env)
    assert_one_line_error(r, "-m or with -hf, not both")
    # one from the environment, one on the command line: the command line wins
    r = cli("tokenize", "-hf", TINY_REPO, "the cat", env={**hub.env, "NUMBAFORMER_MODEL": "x"})
    assert r.code == 0, r.err


def test_a_bare_name_that_is_neither_file_nor_repository(hub):
    assert_one_line_error(cli("info", "test-org/missing", env=hub.env),
                          "test-org/missing is not a file; as a hub model:", "no such repository")


def test_download_is_verified_against_the_hubs_sha256(hub):
    """The corrupt repository serves bytes of the right size with one bit flipped: huggingface_hub
    accepts them (its check is the size), numbaformer's sha256 does not, and the bad file leaves
    the cache so that the next run downloads again."""
    r = cli("info", "-hf", "test-org/corrupt-GGUF", env=hub.env)
    assert_one_line_error(r, "does not match the hub", "sha256", "removed it from the cache")
    assert [p for p in hub.cache.rglob("*.gguf")] == []
    assert list((hub.cache / "models--test-org--corrupt-GGUF" / "blobs").iterdir()) == []


def test_a_cached_file_is_not_hashed_again(hub, monkeypatch):
    calls = []
    real = hubmod._digest
    monkeypatch.setattr(hubmod, "_digest", lambda *a: calls.append(a[1]) or real(*a))
    assert info(hub, "-hf", TINY_REPO)[0].code == 0
    assert calls == ["sha256"]
    assert info(hub, "-hf", TINY_REPO)[0].code == 0            # cached: size and blob name
    assert calls == ["sha256"] and downloads(hub) == ["tiny-Q4_K_M.gguf"]


def test_verify_size_and_git_blob(tmp_path):
    p = tmp_path / "f.gguf"
    p.write_bytes(b"abc")
    sha1 = hashlib.sha1(b"blob 3\0abc").hexdigest()
    hubmod.verify(p, hubmod.RemoteFile("f.gguf", 3, None, sha1), fresh=True, label="f")
    with pytest.raises(hubmod.HubError, match="git blob sha1"):
        hubmod.verify(p, hubmod.RemoteFile("f.gguf", 3, None, "0" * 40), fresh=True, label="f")
    assert not p.exists()
    p.write_bytes(b"abc")
    with pytest.raises(hubmod.HubError, match="3 bytes, the hub says 4"):
        hubmod.verify(p, hubmod.RemoteFile("f.gguf", 4, None, None), fresh=False, label="f")


# --- offline, unreachable -------------------------------------------------------------------------

def test_no_network_and_nothing_cached(hub):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    r = cli("info", "-hf", TINY_REPO, env={**hub.env, **env})
    assert_one_line_error(r, "cannot reach the hub at http://127.0.0.1:",
                          f"no GGUF of {TINY_REPO} is in the cache")


def test_no_network_uses_the_cache_with_a_note(hub):
    assert info(hub, "-hf", f"{TINY_REPO}:Q8_0")[0].code == 0
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    r = cli("tokenize", "-hf", TINY_REPO, "the cat", env={**hub.env, **env})
    assert r.code == 0, r.err
    assert r.err.startswith("note: cannot reach the hub") and "using the cached tiny-Q8_0.gguf" \
        in r.err and len(r.err.splitlines()) == 1


def test_a_server_error_counts_as_unreachable(hub, monkeypatch):
    monkeypatch.setattr(hub.server, "status", 503)
    assert_one_line_error(cli("info", "-hf", TINY_REPO, env=hub.env),
                          "cannot reach the hub at http://127.0.0.1:", "(HTTP 503)")
    monkeypatch.setattr(hub.server, "status", None)
    assert info(hub, "-hf", TINY_REPO)[0].code == 0
    monkeypatch.setattr(hub.server, "status", 503)
    r, d = info(hub, "-hf", TINY_REPO)
    assert r.code == 0 and d["file_type"] == "Q4_K_M", r.err
    assert r.err == ""                                  # --json: quiet, no note


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "--offline"])
def test_offline_uses_the_cache_only(hub, how):
    env, flag = ({**hub.env, "HF_HUB_OFFLINE": "1"}, ()) if how == "HF_HUB_OFFLINE" else \
        (hub.env, ("--offline",))
    assert_one_line_error(cli("info", "-hf", TINY_REPO, *flag, env=env),
                          "offline (--offline or HF_HUB_OFFLINE=1)",
                          f"no GGUF of {TINY_REPO} is in the cache")
    r, online = info(hub, "-hf", f"{TINY_REPO}:Q8_0")
    assert r.code == 0, r.err
    hub.requests.clear()
    r, d = info(hub, "-hf", TINY_REPO, *flag, env=env)      # no Q4_K_M cached: the Q8_0 is
    assert r.code == 0 and r.err == "" and d["path"] == online["path"], r.err
    assert hub.requests == []                                   # not one request
    assert_one_line_error(cli("info", "-hf", f"{TINY_REPO}:Q6_K", *flag, env=env),
                          "no GGUF file for quant Q6_K in the cache; it has: Q8_0")


def test_offline_default_model_not_cached(hub):
    assert_one_line_error(cli("tokenize", "--offline", "hi", env=hub.env),
                          "offline", "default model", "not in the model cache")


# --- generation from a pulled model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_q4km(tmp_path_factory):
    """The test hub's Q4_K_M file, written locally, to compare with."""
    from hub_server import tiny_gguf
    p = tmp_path_factory.mktemp("local") / "tiny-Q4_K_M.gguf"
    p.write_bytes(tiny_gguf(15, 0))
    return p


def test_generate_from_the_hub(hub, tiny_q4km):
    want = cli("generate", "-m", tiny_q4km, *GEN)
    assert want.code == 0, want.err
    r = cli("generate", "-hf", TINY_REPO, *GEN, env=hub.env)
    assert r.code == 0, r.err
    assert r.out == want.out and r.out.strip()
    assert r.err.splitlines()[-1].startswith("[length]")


@pytest.mark.parametrize("args,input", [
    (("score", "the cat sat", "--json"), None),
    (("perplexity", "-f", "-", "-c", 4), "the cat sat on the mat and the dog sat on the log"),
    (("bench", "-p", 4, "-n", 2, "-r", 1, "--json"), None),
    (("chat", "-n", 2, "--temp", 0), "hi\n")])
def test_every_model_command_takes_hf(hub, args, input):
    r = cli(*args[:1], "-hf", f"{TINY_REPO}:Q8_0", *args[1:], "--device", "cpu", input=input,
            env=hub.env)
    assert r.code == 0, r.err
    assert downloads(hub) == ["tiny-Q8_0.gguf"]


def test_process_generate_from_the_hub(hub, tiny_q4km):
    """Through a real process, where huggingface_hub reads HF_ENDPOINT and HF_HOME at import."""
    want = cli("generate", "-m", tiny_q4km, *GEN, "--json")
    p = run_process("generate", "-hf", f"{TINY_REPO}:Q4_K_M", *GEN, "--json", env=hub.env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ids"] == json.loads(want.out)["ids"]
    assert "Traceback" not in p.stderr and downloads(hub) == ["tiny-Q4_K_M.gguf"]
    p = run_process("tokenize", "-hf", TINY_REPO, "the cat",
                    env={**hub.env, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_download_progress_bar_only_on_a_terminal(hub, monkeypatch):
    from numbaformer import progress
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    r = cli("tokenize", "-hf", TINY_REPO, "the cat", env=hub.env)
    assert r.code == 0, r.err
    bar = r.err.split("\r")[-1] if r.err.endswith("\n") else r.err
    assert bar.startswith("tiny-Q4_K_M.gguf: 100%"), r.err       # named by the file
