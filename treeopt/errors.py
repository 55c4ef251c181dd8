"""Error kinds the CLI maps to exit codes: BadInput → 2, anything else → 1; and signals
held back while a library must not be interrupted mid-call."""
from __future__ import annotations

import contextlib
import signal
import threading


class BadInput(ValueError):
    """The user's input is wrong (missing file, malformed JSON, impossible option)."""


def cut(text: str, width: int) -> str:
    """`text` as an error line quotes it: at most `width` characters (… where cut)."""
    return text if len(text) <= width else text[:width - 1] + "…"


def shown(value, width: int = 40) -> str:
    """A value from a file, as an error line quotes it: its repr, cut to `width`."""
    return cut(repr(value), width)


def is_oom(e: BaseException) -> bool:
    """An allocation failure, whoever raised it: Python's MemoryError, CUDA's
    OutOfMemoryError, or the CPU allocator's RuntimeError."""
    text = str(e).lower()
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or \
        "out of memory" in text or "can't allocate memory" in text


@contextlib.contextmanager
def deferred_signals():
    """While active, SIGINT and SIGTERM only set the returned flag (`flag[0]` = the first
    signal) instead of raising wherever the program is — inside a database driver, a
    library's clean-up then runs half-way. The work polls the flag and stops at a safe
    point; on exit the signal is delivered again to the handlers outside."""
    flag: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def hold(signum, frame):
        flag.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if flag:
            signal.raise_signal(flag[0])
