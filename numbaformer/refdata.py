"""Where reference data is found: llama.cpp's tokenizer vectors (`tokenizer-vectors/`) and its
reference outputs (`reference/`).

A checkout carries them in tests/data (the test suite needs nothing beside the checkout). Larger
data may also come from $NUMBAFORMER_SHARED, else a `shared` folder beside the checkout; those are
only looked at for what tests/data does not hold.
"""
from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]     # the source tree this package was imported from


def search_path(checkout: Path = CHECKOUT, shared: bool = True) -> list[Path]:
    """The folders looked in, in order: checkout/tests/data, then (when `shared`)
    $NUMBAFORMER_SHARED if set, else `shared` beside the checkout."""
    folders = [Path(checkout) / "tests" / "data"]
    if shared:
        env = os.environ.get("NUMBAFORMER_SHARED")
        folders.append(Path(env) if env else Path(checkout).parent / "shared")
    return folders


def find_data(rel: str, checkout: Path = CHECKOUT, shared: bool = True) -> Path:
    """The first existing `folder/rel` over search_path(checkout, shared) (a file or a folder);
    FileNotFoundError naming every place tried (and NUMBAFORMER_SHARED) when there is none."""
    tried = [folder / rel for folder in search_path(checkout, shared)]
    for path in tried:
        if path.exists():
            return path
    hint = "; set NUMBAFORMER_SHARED to a folder holding it" if shared else ""
    raise FileNotFoundError(f"{rel} not found (tried {', '.join(map(str, tried))}){hint}")
