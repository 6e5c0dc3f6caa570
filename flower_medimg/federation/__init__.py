"""A secure Flower federation (TLS, SuperNode authentication) on one machine.

``flower-medimg federation up`` runs :func:`up`; ``... down`` runs :func:`down`.
``docs/deployment.md`` shows the same steps across hosts.
"""

from flower_medimg.federation.certificates import TlsFiles, write_tls_files
from flower_medimg.federation.keys import NodeKeys, write_node_keys
from flower_medimg.federation.launcher import (
    STATE_FILE,
    Federation,
    Site,
    add_site,
    down,
    start_supernode,
    status,
    supernode_argv,
    up,
    wait_for_nodes,
)

__all__ = [
    "STATE_FILE",
    "Federation",
    "NodeKeys",
    "Site",
    "TlsFiles",
    "add_site",
    "down",
    "start_supernode",
    "status",
    "supernode_argv",
    "up",
    "wait_for_nodes",
    "write_node_keys",
    "write_tls_files",
]
