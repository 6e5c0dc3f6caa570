"""A site that hangs or exits costs only itself: a deadline and a guard per message.

Flower's simulation runtime runs every site's messages in a shared pool of Ray
actors. A ClientApp that never returns blocks its actor (and, at the end, the whole
``run_simulation``); one that calls ``sys.exit`` takes the actor down with it. In
deployment a hung ``flwr-clientapp`` process keeps its site busy until the SuperLink
gives up. :func:`deadline_mod` therefore ends the process of a message that runs
past its deadline (the ServerApp stopped waiting for it at ``round-timeout``), so
the runtime can replace it: Ray restarts an actor created with ``max_restarts``
(see :func:`flower_medimg.simulation.backend_config`), and in deployment the next
message gets a fresh process. A ``SystemExit`` raised inside a handler becomes an
ordinary error, so Flower sends an error reply instead of losing the process.
"""

from __future__ import annotations

import os
import threading
from logging import ERROR

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import log

__all__ = ["EXPIRED_EXIT_CODE", "deadline_mod"]

#: Exit status of a ClientApp process ended by its deadline.
EXPIRED_EXIT_CODE = 124


def deadline_mod(seconds: float, site: str = "site") -> Mod:
    """Return a mod that ends the process of a message running past ``seconds``.

    Parameters
    ----------
    seconds : float
        The deadline of one message (its handler and every inner mod).
    site : str
        How the log line names the site.
    """

    def expire(message_type: str) -> None:
        log(
            ERROR,
            "%s: %s message still running after %.0f s; ending this ClientApp "
            "process so that the site can serve the next one",
            site,
            message_type,
            seconds,
        )
        os._exit(EXPIRED_EXIT_CODE)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        timer = threading.Timer(seconds, expire, args=(msg.metadata.message_type,))
        timer.daemon = True
        timer.start()
        try:
            return call_next(msg, context)
        except SystemExit as err:
            raise RuntimeError(f"the ClientApp called sys.exit({err.code})") from None
        finally:
            timer.cancel()

    return mod
