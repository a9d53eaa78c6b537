"""Progress bars (tqdm) on stderr for long work: downloads, repacking weights, uploading them to the
GPU. None unless stderr is a terminal, and none for work done within DELAY_S."""
from __future__ import annotations

import sys

from tqdm import tqdm

DELAY_S = 1.0                            # a bar appears once the work has taken this long


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


class Bar(tqdm):
    """tqdm that stays off unless stderr is a terminal and draws only after DELAY_S. Also the
    `tqdm_class` handed to huggingface_hub's downloads."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = kwargs.get("disable") or not stderr_is_terminal()
        kwargs.setdefault("delay", DELAY_S)
        kwargs.setdefault("file", sys.stderr)
        super().__init__(*args, **kwargs)


def byte_bar(total: int, desc: str) -> Bar:
    """A bar over `total` bytes, cleared when done."""
    return Bar(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def download_bar(name: str) -> type[Bar]:
    """The Bar class for huggingface_hub's download of file `name`: the bar shows the name where
    the client would show the tail of the URL."""
    class DownloadBar(Bar):
        def __init__(self, *args, **kwargs):
            if str(kwargs.get("desc") or "").startswith(("(…)", "http")):
                kwargs["desc"] = name
            super().__init__(*args, **kwargs)
    return DownloadBar
