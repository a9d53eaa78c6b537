#!/usr/bin/env python3
"""Download the default test model (SmolLM2-135M-Instruct Q4_1) into the numbaformer cache.

usage: python scripts/fetch_models.py
Prints the cached path. NUMBAFORMER_CACHE overrides ~/.cache/numbaformer/models.
"""
import sys

from numbaformer.fetch import FetchError, fetch_model


def main() -> int:
    try:
        path = fetch_model()
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
