"""Flower's simulation runtime, set up so that one site's failure costs only itself.

Flower's Ray backend runs the sites' messages on a pool of actors shared by all
sites. When a ClientApp ends its process (a crash, ``os._exit``, or the message
deadline of :mod:`flower_medimg.client_apps.watchdog`), its actor dies and Flower
puts the dead actor back into the pool: every later message sent to it fails, for
the honest sites too. Ray restarts an actor created with ``max_restarts``, and
Flower passes every ``client_resources`` entry to the actor's ``options``, so
:func:`backend_config` asks for restarts there. ``flwr run .`` builds its backend
configuration from fixed fields (CPUs and GPUs per client) and cannot ask for
restarts: use ``run_simulation`` with this configuration (as the experiment runner
and the tests do) when sites may die.
"""

from __future__ import annotations

from typing import Any

__all__ = ["backend_config"]


def backend_config(num_cpus: float = 1, num_gpus: float = 0.0) -> dict[str, Any]:
    """Return a ``run_simulation`` backend config whose actors are restarted.

    Parameters
    ----------
    num_cpus : float
        CPUs per simulated site (the actor pool holds ``CPUs / num_cpus`` actors).
    num_gpus : float
        GPUs (or a fraction) per simulated site.
    """
    return {
        "client_resources": {
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "max_restarts": -1,  # a dead actor comes back for the next message
        }
    }
