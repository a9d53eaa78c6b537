"""The `numbaformer` command: each subcommand parses options and calls library functions.

Every expected failure (bad file, bad argument, no GPU, ...) prints one line `error: ...` to stderr
and exits 2; no traceback.
"""
from __future__ import annotations

import json
import math
import sys
import time

import click

from .generate import plural
from .sampling import SamplingParams

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130                  # 128 + SIGINT, as shells and llama.cpp's tools report Ctrl-C


class UserError(Exception):
    """A one-line message for the user."""


def _engine(model, device="auto", gpu=0, threads=None, ctx=None, quiet=False, batch=None,
            kv_type=None, exact=False):
    """The engine; quiet (--json) keeps the notes off stderr, but a kernel compile is still
    announced there: every run that compiles says so."""
    from .engine import load_engine
    return load_engine(model, device=device, gpu=gpu, threads=threads, n_ctx=ctx, quiet=quiet,
                       n_batch=batch, kv_type=kv_type, exact=exact, announce_compiles=True)


def _decode(data: bytes, source: str) -> str:
    """data as UTF-8; a UserError naming `source` and the first bad byte when it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start})") from None


def _checked_text(text: str, source: str) -> str:
    """text, if it is valid UTF-8. Python hands over undecodable bytes of arguments (and of stdin
    in some locales) as lone surrogates; those become a UserError naming `source` and the byte."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return _decode(text.encode("utf-8", "surrogateescape"), source)
        except UnicodeEncodeError:                   # a surrogate that is not an escaped byte
            raise UserError(f"{source} is not valid UTF-8") from None


def _read_stdin(what: str) -> str:
    if sys.stdin is None:                            # started with stdin closed (`<&-`)
        raise UserError(f"cannot read the {what} from stdin: it is closed")
    try:
        data = sys.stdin.buffer.read()
    except (OSError, ValueError) as e:               # a directory, a closed file, ...
        raise UserError(f"cannot read the {what} from stdin: "
                        f"{getattr(e, 'strerror', None) or e}") from None
    return _decode(data, f"the {what} on stdin")


def _read_text(text: str | None, file: str | None, what: str = "prompt") -> str:
    if (text is None) == (file is None):
        raise UserError(f"give the {what} as an argument/option or with -f FILE, not both or none")
    if file is None:
        return _checked_text(text, f"the {what}")
    if file == "-":
        return _read_stdin(what)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror or e}") from None
    return _decode(data, file)


device_opt = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                          show_default=True, help="Where to run (CUDA_FORCE_CPU=1 forces cpu).")
gpu_opt = click.option("--gpu", type=click.IntRange(min=0), default=0, help="CUDA device index.")
threads_opt = click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
                           help="CPU threads (default: all cores).")
kv_opt = click.option("--kv-type", type=click.Choice(["f16", "f32"]), default=None,
                       help="KV cache precision (default: f16 on CUDA, f32 on the CPU).")
exact_opt = click.option("--exact", is_flag=True,
                         help="Exact matrix products: f32 activations and arithmetic (default: "
                              "decode mat-vecs on 8-bit activations where the type has a fast "
                              "path, on the GPU and the CPU, as llama.cpp).")
model_opt = click.option("-m", "--model", "model", type=str, default=None,
                         help="GGUF file, or a hub model as for -hf (default: "
                              "SmolLM2-135M-Instruct Q4_1, fetched once).")
hf_opt = click.option("-hf", "--hf-repo", "hf_repo", metavar="ORG/REPO[:QUANT]", default=None,
                      help="A GGUF from the Hugging Face hub: the file whose name carries QUANT "
                           "(case-insensitive; default Q4_K_M, else the first), downloaded once "
                           "into the hub's cache and verified (HF_TOKEN, HF_ENDPOINT, HF_HOME).")
offline_opt = click.option("--offline", is_flag=True,
                           help="Use the caches only, no network (also HF_HUB_OFFLINE=1).")


def model_options(f):
    """-m, -hf and --offline: the model of a command."""
    return model_opt(hf_opt(offline_opt(f)))


def _model_path(model: str | None, hf_repo: str | None, offline: bool,
                quiet: bool = False) -> str:
    """The local GGUF that -m or -hf names (a hub model pulled first; the default model without
    either). Given both, the one on the command line wins over one from the environment."""
    from click.core import ParameterSource

    from .engine import resolve_model_path
    if model and hf_repo:
        ctx = click.get_current_context()
        on_line = [ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE
                   for k in ("model", "hf_repo")]
        if on_line[0] == on_line[1]:
            raise UserError("give the model with -m or with -hf, not both")
        model, hf_repo = (model, None) if on_line[0] else (None, hf_repo)
    if hf_repo:
        from .hub import parse_ref, pull
        return str(pull(parse_ref(hf_repo), offline=offline, quiet=quiet))
    return resolve_model_path(model, quiet=quiet, offline=offline)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="numbaformer")
def cli():
    """numbaformer: GGUF language models on GPU and CPU kernels written in Python (Numba)."""


@cli.command()
@click.argument("model", required=False)
@hf_opt
@offline_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-c", "--ctx", type=click.IntRange(min=1), default=None,
              help="Context for the KV-cache estimate (default: the model's).")
def info(model, hf_repo, offline, as_json, ctx):
    """Describe a GGUF model (MODEL: a file or a hub model, or -hf): architecture, sizes, tensor
    types, memory needed."""
    from .info import format_info, model_info
    from .loader import load_model_file
    if not model and not hf_repo:
        raise UserError("give the model: a GGUF file (MODEL) or -hf ORG/REPO[:QUANT]")
    mf = load_model_file(_model_path(model, hf_repo, offline, quiet=as_json))
    d = model_info(mf, ctx)
    click.echo(json.dumps(d, indent=2) if as_json else format_info(d))


@cli.command()
@model_options
@click.argument("text", required=False)
@click.option("-f", "--file", type=str, default=None, help="Read the text from FILE (- = stdin).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"ids": [...], "pieces": [readable text], "vocab_pieces": [as stored]}.')
@click.option("--no-special", is_flag=True, help="Do not parse special tokens in the text.")
def tokenize(model, hf_repo, offline, text, file, as_json, no_special):
    """Print the token ids of TEXT (the model may be a vocab-only GGUF, as llama.cpp's
    models/ggml-vocab-*.gguf)."""
    from .loader import load_tokenizer
    text = _read_text(text, file, "text")
    tok = load_tokenizer(_model_path(model, hf_repo, offline))
    ids = tok.encode(text, add_special=True, parse_special=not no_special)
    if as_json:
        click.echo(json.dumps({"ids": ids, "pieces": [tok.token_text(i) for i in ids],
                               "vocab_pieces": [tok.piece(i) for i in ids]}, ensure_ascii=False))
    else:
        click.echo(" ".join(map(str, ids)))


def _sampling(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence, frequency, seed):
    p = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                       repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                       presence_penalty=presence, frequency_penalty=frequency,
                       seed=None if seed is None or seed < 0 else seed)
    try:
        p.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    return p


def sampling_options(f):
    opts = [
        click.option("--temp", type=float, default=0.8, show_default=True,
                     help="Temperature; 0 = greedy."),
        click.option("--top-k", type=int, default=40, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=0.95, show_default=True, help="1.0 = off."),
        click.option("--min-p", type=float, default=0.05, show_default=True, help="0.0 = off."),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True),
        click.option("--repeat-last-n", type=int, default=64, show_default=True),
        click.option("--presence-penalty", type=float, default=0.0, show_default=True),
        click.option("--frequency-penalty", type=float, default=0.0, show_default=True),
        click.option("-s", "--seed", type=int, default=None, help="RNG seed (default: random)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@cli.command()
@model_options
@click.option("-p", "--prompt", type=str, default=None, help="Prompt text (special tokens parsed).")
@click.option("-f", "--file", type=str, default=None, help="Read the prompt from FILE (- = stdin).")
@click.option("-n", "--n-predict", type=click.IntRange(min=-1), default=128, show_default=True,
              help="Tokens to generate at most (-1: until an end-of-generation token or the end "
                   "of the context).")
@click.option("-c", "--ctx", type=click.IntRange(min=1), default=None,
              help="Context size (default: min(model's, 4096)).")
@sampling_options
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-generation tokens.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("-sys", "--system", type=str, default=None, help="System message (with --chat).")
@device_opt
@gpu_opt
@threads_opt
@kv_opt
@exact_opt
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
@click.option("--logprobs", type=click.IntRange(min=0, max=100), default=0,
              help="With --json (needs it): the top K log-probs of each generated token.")
@click.option("-v", "--verbose", is_flag=True, help="Print backend statistics.")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="Batch mode: -f FILE (- = stdin) is JSON lines, one request each "
                   '({"prompt": ...} or {"messages": [...]}, optional max_tokens, temperature, '
                   "top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty, "
                   "frequency_penalty, seed, stop, id; the options give the defaults), run this "
                   "many at a time; one result per line in input order (with --json: one JSON "
                   "object each).")
def generate(model, hf_repo, offline, prompt, file, n_predict, ctx, temp, top_k, top_p, min_p,
             repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, seed, stop,
             ignore_eos, chat, system, device, gpu, threads, kv_type, exact, as_json, logprobs,
             verbose, parallel):
    """Generate text from a prompt, streaming it to stdout (stats on stderr); with --parallel,
    many prompts from a JSON-lines file at once."""
    from .generate import stream_generate
    from .sampling import make_sampler
    if logprobs and not as_json:
        raise UserError("--logprobs needs --json (the log-probs are part of the JSON object)")
    params = _sampling(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                       presence_penalty, frequency_penalty, seed)
    if parallel is not None:
        from .batch import Request
        if prompt is not None or file is None or logprobs:
            raise UserError("--parallel takes its requests from -f FILE (JSON lines), without "
                            "-p or --logprobs")
        system = None if system is None else _checked_text(system, "the system message")
        defaults = Request(0, params=params, max_tokens=n_predict, stop=tuple(stop))
        _generate_batch(_read_text(None, file, "requests"), defaults, parallel, chat, system,
                        ignore_eos, as_json, verbose,
                        dict(model=model, hf_repo=hf_repo, offline=offline, device=device,
                             gpu=gpu, threads=threads, ctx=ctx, kv_type=kv_type, exact=exact))
        return
    text = _read_text(prompt, file)
    system = None if system is None else _checked_text(system, "the system message")
    model = _model_path(model, hf_repo, offline, quiet=as_json)
    eng = _engine(model, device, gpu, threads, ctx, quiet=as_json, kv_type=kv_type, exact=exact)
    tok = eng.tokenizer
    if chat:
        from .chat_template import render_model_chat
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}]
        text = render_model_chat(eng.mf.gguf.metadata, tok, msgs)
    ids = tok.encode(text, add_special=True, parse_special=True)
    if len(ids) >= eng.model.n_ctx:
        raise UserError(f"the prompt has {plural(len(ids))}; the context holds "
                        f"{eng.model.n_ctx} (use -c to raise it)")
    on_text = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    res = stream_generate(eng.model, tok, ids, make_sampler(params), max_tokens=n_predict,
                          stop=stop, ignore_eos=ignore_eos, logprobs=logprobs if as_json else 0,
                          on_text=on_text)
    res.stats.load_s = eng.load_s
    _report(eng, ids, res, as_json, logprobs, verbose)
    if res.finish_reason == "interrupted":            # Ctrl-C: what came out is printed, exit 130
        sys.exit(EXIT_INTERRUPTED)


def _generate_batch(text: str, defaults, parallel: int, chat: bool, system: str | None,
                    ignore_eos: bool, as_json: bool, verbose: bool, load: dict) -> None:
    """generate --parallel: every line checked (before the model loads, then after, before any
    generation), run `parallel` at a time, each result written in input order as it can be."""
    from .batch import in_order, parse_requests, prepare, run_batch, summary
    reqs = parse_requests(text, defaults)
    model = _model_path(load["model"], load["hf_repo"], load["offline"], quiet=as_json)
    eng = _engine(model, load["device"], load["gpu"], load["threads"], load["ctx"],
                  quiet=as_json, kv_type=load["kv_type"], exact=load["exact"])
    prepare(eng, reqs, chat=chat, system=system)

    def write(res) -> None:
        if as_json:
            click.echo(json.dumps(res.as_dict(), ensure_ascii=False))
        else:
            r = res.request
            click.echo(f"--- line {r.line} [{res.finish_reason}, {plural(len(res.ids))}] ---")
            click.echo(res.text)

    results = run_batch(eng, reqs, parallel, ignore_eos=ignore_eos,
                        on_result=in_order(reqs, write))
    if not as_json:
        click.echo(summary(results), err=True)
    if verbose:
        click.echo(f"backend: {json.dumps(eng.backend.stats())}", err=True)


def _report(eng, ids, res, as_json: bool, logprobs: int, verbose: bool) -> None:
    """generate's output after the text: one JSON object, or the finish reason and the speed on
    stderr (with a line saying so when the context filled up)."""
    if as_json:
        out = {"model": eng.mf.path, "device": eng.backend.name, "prompt_ids": ids,
               "ids": res.ids, "text": res.text, "finish_reason": res.finish_reason,
               "timings": res.stats.as_dict()}
        if logprobs:
            out["logprobs"] = res.logprobs
        click.echo(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        if res.finish_reason == "context":
            click.echo(f"note: generation stopped: the context is full "
                       f"({plural(eng.model.n_ctx)}); raise it with -c (this model takes up to "
                       f"{eng.config.n_ctx_train})", err=True)
        click.echo(f"[{res.finish_reason}] {res.stats.summary()}", err=True)
    if verbose:
        click.echo(f"backend: {json.dumps(eng.backend.stats())}", err=True)


def _read_line(prompt: str) -> str:
    """input() for the chat: a closed stdin ends the chat as Ctrl-D does; a line that is not UTF-8
    is a UserError."""
    if sys.stdin is None:
        raise EOFError
    try:
        line = input(prompt)
    except UnicodeDecodeError as e:
        raise UserError(f"the chat input is not valid UTF-8 (byte 0x{e.object[e.start]:02x})"
                        ) from None
    except OSError as e:
        raise UserError(f"cannot read the chat input from stdin: {e.strerror or e}") from None
    return _checked_text(line, "the chat input")


@cli.command()
@model_options
@click.option("-sys", "--system", type=str, default=None, help="System message.")
@click.option("-n", "--n-predict", type=click.IntRange(min=-1), default=512, show_default=True,
              help="Tokens per reply at most (-1: until the end of the reply or of the context).")
@click.option("-c", "--ctx", type=click.IntRange(min=1), default=None,
              help="Context size (default: min(model's, 4096)).")
@sampling_options
@device_opt
@gpu_opt
@threads_opt
@kv_opt
@exact_opt
@click.option("--stats", is_flag=True, help="Print the speed of each reply (stderr).")
def chat(model, hf_repo, offline, system, n_predict, ctx, temp, top_k, top_p, min_p, repeat_penalty,
         repeat_last_n, presence_penalty, frequency_penalty, seed, device, gpu, threads, kv_type,
         exact, stats):
    """Interactive chat: history kept, Ctrl-C stops a reply, Ctrl-D quits, /help."""
    from .chat import run_chat
    params = _sampling(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                       presence_penalty, frequency_penalty, seed)
    system = None if system is None else _checked_text(system, "the system message")
    model = _model_path(model, hf_repo, offline)
    run_chat(_engine(model, device, gpu, threads, ctx, kv_type=kv_type, exact=exact), params,
             system=system,
             max_tokens=n_predict, stats=stats, read=_read_line)


def _read_ids(ids_file: str) -> list[int]:
    try:
        ids = json.loads(_read_text(None, ids_file, "ids"))
    except json.JSONDecodeError as e:
        raise UserError(f"{ids_file}: not JSON: {e.msg} (line {e.lineno})") from None
    if not (isinstance(ids, list) and ids and all(type(i) is int for i in ids)):
        raise UserError(f"{ids_file}: expected a non-empty JSON list of integer token ids")
    return ids


@cli.command()
@model_options
@click.argument("text", required=False)
@click.option("-f", "--file", type=str, default=None, help="Read the text from FILE (- = stdin).")
@click.option("--ids-file", type=str, default=None,
              help="Score these token ids (a JSON list) instead of a text.")
@click.option("--top-k", type=click.IntRange(min=1, max=1000), default=8, show_default=True,
              help="The most likely tokens shown beside each actual one.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: every position's next token, its log-prob, the top-k.")
@device_opt
@gpu_opt
@threads_opt
@kv_opt
def score(model, hf_repo, offline, text, file, ids_file, top_k, as_json, device, gpu, threads,
          kv_type):
    """Score TEXT (or token ids): the log-prob of each actual next token, teacher-forced, with the
    top-k tokens the model expected there, and the total."""
    from .scoring import score_ids
    if ids_file is not None and (text is not None or file is not None):
        raise UserError("give a text (TEXT or -f FILE) or --ids-file, not both")
    ids = _read_ids(ids_file) if ids_file is not None else None
    text = _read_text(text, file, "text") if ids is None else None
    model = _model_path(model, hf_repo, offline, quiet=as_json)
    eng = _engine(model, device, gpu, threads, ctx=None, quiet=as_json, kv_type=kv_type)
    if ids is None:
        ids = eng.tokenizer.encode(text, add_special=True, parse_special=True)
        if not ids:
            raise UserError("the text is empty: nothing to score")
    bad = next((i for i in ids if not 0 <= i < eng.config.n_vocab), None)
    if bad is not None:                 # before numpy, which overflows on ids past int64
        raise UserError(f"{ids_file}: token id {bad} is outside the vocabulary "
                        f"(0..{eng.config.n_vocab - 1})")
    if len(ids) > eng.model.n_ctx:
        eng = _engine(model, device, gpu, threads, ctx=min(len(ids), eng.config.n_ctx_train),
                      quiet=True, kv_type=kv_type)
    positions = score_ids(eng.model, ids, top_k)
    total = float(sum(p["logprob"] for p in positions[:-1]))
    n = len(ids) - 1
    ppl = math.exp(-total / n) if n else None
    if as_json:
        click.echo(json.dumps({"model": eng.mf.path, "ids": ids, "positions": positions,
                               "logprob": total, "n_scored": n, "perplexity": ppl}))
    else:
        _print_scores(eng.tokenizer, positions, total, ppl)


def _print_scores(tok, positions: list[dict], total: float, ppl: float | None) -> None:
    """score's table: each scored token, its log-prob and the model's top choice; the total."""
    click.echo(f"{'pos':>5} {'logprob':>9}  {'token':<24} top-1")
    for i, p in enumerate(positions[:-1], start=1):
        best, best_lp = p["top"][0]
        click.echo(f"{i:>5} {p['logprob']:>9.4f}  {tok.token_text(p['id'])!r:<24} "
                   f"{tok.token_text(best)!r} {best_lp:.4f}")
    click.echo(f"log-prob {total:.4f} over {plural(len(positions) - 1)}"
               + (f", perplexity {ppl:.4f}" if ppl is not None else ""))


@cli.command()
@model_options
@click.option("-f", "--file", required=True, type=str, help="Text file (- = stdin).")
@click.option("-c", "--ctx", type=click.IntRange(min=4), default=512, show_default=True)
@device_opt
@gpu_opt
@threads_opt
@kv_opt
def perplexity(model, hf_repo, offline, file, ctx, device, gpu, threads, kv_type):
    """Perplexity of a text, as llama-perplexity computes it (progress per chunk on stderr)."""
    from .scoring import perplexity as ppl
    text = _read_text(None, file, "text")
    eng = _engine(_model_path(model, hf_repo, offline), device, gpu, threads, ctx,
                  kv_type=kv_type)
    tok = eng.tokenizer
    ids = tok.encode(text, add_special=False, parse_special=False)
    t0 = time.perf_counter()

    def progress(done: int, total: int, so_far: float) -> None:
        click.echo(f"chunk {done}/{total}: perplexity {so_far:.4f} "
                   f"({time.perf_counter() - t0:.1f} s)", err=True)

    value, n = ppl(eng.model, ids, ctx, tok.bos_id if tok.add_bos else None, on_chunk=progress)
    click.echo(f"perplexity: {value:.4f} over {plural(n)} (context {ctx})")


def _counts(value: str | None) -> list[int] | None:
    """--parallel's list: "1,4,16,64" -> [1, 4, 16, 64] (each >= 1)."""
    if value is None:
        return None
    try:
        counts = [int(v) for v in value.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--parallel takes counts >= 1 separated by commas (1,4,16), "
                        f"not {value!r}")
    return counts


@cli.command()
@model_options
@click.option("-p", "--n-prompt", type=click.IntRange(min=0), default=None,
              help="Prompt tokens (default 512; with --parallel, 128 per sequence).")
@click.option("-n", "--n-gen", type=click.IntRange(min=0), default=128, show_default=True,
              help="Generated tokens (with --parallel: decode steps of every sequence).")
@click.option("-r", "--reps", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--parallel", type=str, default=None, metavar="B[,B...]",
              help="llama-batched-bench's table instead: for each count B, B sequences of -p "
                   "tokens prefilled together, then -n decode steps of all of them, through the "
                   "engine's batched path (each count timed once, after a warm-up run at that count).")
@device_opt
@gpu_opt
@threads_opt
@kv_opt
@exact_opt
@click.option("--kernels", is_flag=True,
              help="Also time every op of a decode step (at position n-gen / 2): bytes read, "
                   "GB/s and % of the copy bandwidth measured in the same run.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench(model, hf_repo, offline, n_prompt, n_gen, reps, parallel, device, gpu, threads, kv_type,
          exact, kernels, as_json):
    """Prompt-processing and generation throughput (llama-bench style); with --parallel, of
    many sequences at once (llama-batched-bench style)."""
    from .bench import format_table, run_bench
    counts = _counts(parallel)
    if counts is not None:
        return _bench_parallel(model, hf_repo, offline, counts, 128 if n_prompt is None else
                               n_prompt, n_gen, kernels, as_json,
                               dict(device=device, gpu=gpu, threads=threads, kv_type=kv_type,
                                    exact=exact))
    n_prompt = 512 if n_prompt is None else n_prompt
    if n_prompt == 0 and n_gen == 0:
        raise UserError("nothing to measure: -p and -n are both 0")
    model = _model_path(model, hf_repo, offline, quiet=as_json)
    eng = _engine(model, device, gpu, threads, ctx=max(n_prompt, n_gen, 16), quiet=as_json,
                  batch=max(n_prompt, 1), kv_type=kv_type, exact=exact)
    rows = run_bench(eng, n_prompt, n_gen, reps)
    prof = None
    if kernels:
        from .profile import profile_decode
        prof = profile_decode(eng.model, n_gen // 2)
    if as_json:
        click.echo(json.dumps({"rows": rows, "kernels": prof.as_dict()} if prof else rows,
                              indent=2))
    else:
        click.echo(format_table(rows))
        if prof:
            click.echo("\n" + prof.table(f"decode step at position {prof.position} "
                                         f"({eng.backend.name})"))
    stats = eng.backend.stats()
    if stats:
        click.echo(f"backend: {json.dumps(stats)}", err=True)


def _bench_parallel(model, hf_repo, offline, counts: list[int], n_prompt: int, n_gen: int,
                    kernels: bool, as_json: bool, load: dict) -> None:
    from .bench import format_parallel_table, run_parallel_bench
    if kernels:
        raise UserError("--kernels profiles the single-sequence decode: not with --parallel")
    if n_prompt == 0 or n_gen == 0:
        raise UserError("--parallel needs -p >= 1 and -n >= 1")
    model = _model_path(model, hf_repo, offline, quiet=as_json)
    eng = _engine(model, ctx=n_prompt + n_gen + 1, quiet=as_json, batch=min(n_prompt, 512),
                  **load)
    rows = run_parallel_bench(eng, counts, n_prompt, n_gen)
    click.echo(json.dumps(rows, indent=2) if as_json else format_parallel_table(rows))


@cli.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("-np", "--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="Sequences decoded together (continuous batching).")
@click.option("-c", "--ctx", type=click.IntRange(min=1), default=None,
              help="Context size per sequence (default: min(model's, 4096)).")
@click.option("--max-batched-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Rows (prompt chunks and decodes) in one step.")
@click.option("-n", "--n-predict", type=click.IntRange(min=-1), default=-1, show_default=True,
              help="Tokens per request at most, whatever max_tokens asks (-1: the context).")
@click.option("--decode-steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="Greedy decode steps a device replay may run while every running request is "
                   "plain greedy (GPU; more: less host time per token, tokens streamed in bursts).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting beyond the running ones; past that: 429 with Retry-After.")
@click.option("--max-body", type=click.IntRange(min=1024), default=4 << 20, show_default=True,
              help="Largest request body in bytes (larger: 413).")
@click.option("--api-key", default=None, help="Require Authorization: Bearer KEY on /v1.")
@click.option("--alias", default=None, help="The model's name in /v1/models and responses "
                                            "(default: the file's name).")
@device_opt
@gpu_opt
@threads_opt
@kv_opt
def serve(model, hf_repo, offline, host, port, parallel, ctx, max_batched_tokens, n_predict,
          decode_steps, max_queue, max_body, api_key, alias, device, gpu, threads, kv_type):
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health,
    /metrics; continuous batching of up to -np sequences."""
    import os

    from .serve.app import Settings, run
    if n_predict == 0:
        raise UserError("-n 0 would answer every request with nothing: give N > 0, or -1")
    if max_batched_tokens < parallel:
        raise UserError(f"--max-batched-tokens ({max_batched_tokens}) must cover one decode row "
                        f"per sequence (-np {parallel})")
    from .model import MAX_CHUNK
    if decode_steps > MAX_CHUNK:
        raise UserError(f"--decode-steps must be 1..{MAX_CHUNK} (steps one replay runs), "
                        f"not {decode_steps}")
    path = _model_path(model, hf_repo, offline)
    settings = Settings(model_name=alias or os.path.basename(path), api_key=api_key,
                        max_queue=max_queue, max_body=max_body, n_predict=n_predict)

    def load():
        return _engine(path, device, gpu, threads, ctx, kv_type=kv_type)

    sys.exit(run(load, host=host, port=port, n_seqs=parallel,
                 max_batched_tokens=max_batched_tokens, settings=settings,
                 decode_steps=decode_steps))


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_context
def models(ctx, as_json):
    """List the models in the caches (the default model's, the hub's GGUFs): name, size,
    architecture, quant type, path. `models rm NAME` removes one."""
    if ctx.invoked_subcommand is not None:
        return
    from .catalog import describe, entries, format_table
    rows = [describe(e) for e in entries()]
    click.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))


@models.command("rm")
@click.argument("name")
def models_rm(name):
    """Remove a model from the caches: NAME as `models` lists it, or ORG/REPO for all of a hub
    repository's files."""
    from .catalog import remove
    for e in remove(name):
        click.echo(f"removed {e.name} ({e.path})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def devices(as_json):
    """The CUDA devices numbaformer sees (name, memory free/total, compute capability), or why
    there are none; the CPU and its thread count."""
    from .backends import cpu_info, cuda_devices
    gpus, reason = cuda_devices()
    cpu = cpu_info()
    if as_json:
        click.echo(json.dumps({"cuda": gpus, "cuda_unavailable": reason, "cpu": cpu}, indent=2))
        return
    click.echo(f"CUDA: none ({reason})" if reason else f"CUDA: {plural(len(gpus), 'device')}")
    for g in gpus:
        mem = ("" if g["memory_total"] is None else
               f", {g['memory_free'] / 2**30:.1f} GiB free of {g['memory_total'] / 2**30:.1f} GiB")
        cc = "" if g["compute_capability"] is None else \
            f", compute capability {g['compute_capability']}"
        click.echo(f"  {g['index']}: {g['name']}{cc}{mem}")
    click.echo(f"CPU: {cpu['name']}, {cpu['cores']} cores ({cpu['usable_cores']} usable), "
               f"{cpu['threads']} threads by default (-t to change), {cpu['simd']}")


ENV_PREFIX = "NUMBAFORMER"


def _env_options(group: click.Group) -> None:
    """Every option of every command may come from NUMBAFORMER_<OPTION>, shown in --help: Click's
    auto_envvar_prefix, set on each command (not only on the group, which would put the command's
    name in the variable: one variable serves every command with the option), and an explicit
    name where the parameter's is not the option's (--json: NUMBAFORMER_JSON, not _AS_JSON)."""
    for cmd in group.commands.values():
        cmd.context_settings.setdefault("auto_envvar_prefix", ENV_PREFIX)
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            p.show_envvar = True
            flag = max(p.opts, key=len).lstrip("-").replace("-", "_")
            if p.envvar is None and flag != p.name:
                p.envvar = f"{ENV_PREFIX}_{flag.upper()}"
        if isinstance(cmd, click.Group):
            _env_options(cmd)


_env_options(cli)


def _from_env(e: click.ClickException) -> str:
    """' (from NUMBAFORMER_X)' when the bad value of e came from that variable and the message
    does not say so, else ''."""
    from click.core import ParameterSource
    ctx, param = getattr(e, "ctx", None), getattr(e, "param", None)
    if ctx is None or param is None or \
            ctx.get_parameter_source(param.name) != ParameterSource.ENVIRONMENT:
        return ""
    name = param.envvar if isinstance(param.envvar, str) else f"{ENV_PREFIX}_{param.name.upper()}"
    return "" if name in e.format_message() else f" (from {name})"


def _expected_errors():
    from .backends import BackendError
    from .chat_template import ChatTemplateError
    from .fetch import FetchError
    from .gguf_file import GGUFError
    return (UserError, GGUFError, BackendError, ChatTemplateError, FetchError, ValueError,
            MemoryError, OSError)


# click >= 8.2 raises this for a group called without arguments; older versions print the help
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv=None) -> None:
    """Console entry point: Click with one-line errors and exit code 2."""
    try:
        cli.main(args=argv, prog_name="numbaformer", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except _NO_ARGS_IS_HELP as e:         # `numbaformer` alone (click >= 8.2): the help, not an error
        click.echo(e.ctx.get_help())
        sys.exit(0)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}{_from_env(e)}", err=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except _expected_errors() as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        click.echo(f"error: {msg}", err=True)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
