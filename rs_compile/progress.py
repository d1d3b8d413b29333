"""Progress bars on stderr for the CLI's long steps: a model load, a first torch.compile, a timing
loop. One step can run for minutes without finishing an iteration, so the bar redraws on its own
and always shows the elapsed time."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress(desc: str, total: int | None = None) -> Iterator[tqdm]:
    """A tqdm bar redrawn twice a second; without ``total`` it shows only the elapsed time. Yields
    the bar (``update``, ``set_description``)."""
    bar = tqdm(desc=desc, total=total, bar_format=None if total else "{desc}: {elapsed}", leave=True)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        bar.close()
