"""Import libraries that configure logging on import, without letting them.

Opacus calls ``logging.basicConfig`` when imported (``opacus.utils.module_utils``),
which gives the root logger a handler and prints every Flower log line twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["root_logger_kept"]


@contextlib.contextmanager
def root_logger_kept() -> Iterator[None]:
    """Put the root logger's handlers back as they were when the block ends."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        yield
    finally:
        root.handlers[:] = handlers
