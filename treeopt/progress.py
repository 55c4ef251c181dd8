"""Progress bars on stderr for long library work (quiet=True turns them off)."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, quiet: bool = False,
             initial: int = 0):
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, disable=quiet,
                dynamic_ncols=True, leave=False, initial=initial)
