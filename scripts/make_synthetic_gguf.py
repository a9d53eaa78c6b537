#!/usr/bin/env python3
"""Write a random-weight GGUF model with real shapes and a real tokenizer (numbaformer.synthetic).

    python scripts/make_synthetic_gguf.py --preset llama3-8b --type Q4_K --output-type Q6_K \
        -o /tmp/llama3-8b-q4k.gguf [--layers N] [--seed S]

For speed work and for tests of architectures without a real file; never for judging quality.
Needs only numpy and gguf, and runs from a clone without the package installed. The vocab files
are read from tests/data/tokenizer-vectors of the checkout (numbaformer.refdata).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from numbaformer.synthetic import PRESETS, SUPPORTED_TYPES, write_synthetic  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--type", default="Q4_K", choices=SUPPORTED_TYPES,
                    help="type of every weight matrix (default Q4_K)")
    ap.add_argument("--output-type", default="Q6_K", choices=SUPPORTED_TYPES,
                    help="type of output.weight, and of token_embd when tied (default Q6_K)")
    ap.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-from", default=None,
                    help="copy the tokenizer of this GGUF (e.g. the real model) instead of the "
                         "preset's vocab file")
    a = ap.parse_args(argv)
    if a.layers is not None and a.layers < 1:
        ap.error("--layers must be at least 1")
    t0 = time.perf_counter()
    try:
        size = write_synthetic(a.output, a.preset, a.type, a.output_type, n_layer=a.layers,
                               seed=a.seed, vocab_file=a.vocab_from)
    except (OSError, ValueError) as e:
        sys.exit(f"make_synthetic_gguf.py: error: {e}")
    print(f"{a.output}  {size} bytes ({size / 2**30:.2f} GiB)  in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
