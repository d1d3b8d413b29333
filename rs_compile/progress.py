"""Progress bars on stderr for the CLI's long steps: a model load, a first torch.compile, a timing
loop. One step can run for minutes without finishing an iteration, so the bar redraws on its own
and always shows the elapsed time: twice a second on a terminal, every 30 s into a file or pipe
(a log of a long run stays readable)."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress(desc: str, total: int | None = None) -> Iterator[tqdm]:
    """A tqdm bar redrawn on its own (see the module doc); without ``total`` it shows only the
    elapsed time. Yields the bar (``update``, ``set_description``)."""
    interval = 0.5 if sys.stderr.isatty() else 30.0
    bar = tqdm(desc=desc, total=total, bar_format=None if total else "{desc}: {elapsed}", leave=True,
               mininterval=interval)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        bar.close()
