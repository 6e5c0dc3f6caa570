"""A hospital's side of a deployment: its SuperNode and a warm site runtime.

``flower-medimg site start --config site.toml`` runs the site's SuperNode (TLS,
its authentication key, its ``node_config``) and, by default, one long-lived site
runtime (:class:`~flower_medimg.site.runtime.SiteRuntime`) that runs the
ClientApp's messages from a warm process, forking one child per message.
"""

from flower_medimg.site.config import (
    SiteConfig,
    SiteConfigError,
    load_site_config,
    write_site_config,
)
from flower_medimg.site.runtime import SiteRuntime
from flower_medimg.site.service import site_status, start_site, stop_site

__all__ = [
    "SiteConfig",
    "SiteConfigError",
    "SiteRuntime",
    "load_site_config",
    "site_status",
    "start_site",
    "stop_site",
    "write_site_config",
]
