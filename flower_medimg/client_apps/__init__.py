"""Site side: ClientApps and the training-time pieces they compose."""

from .app import make_client_app
from .bundle import make_bundle_client_app

#: The ClientApp named in ``pyproject.toml``: the run config's ``task`` decides.
app = make_client_app()
segmentation_app = make_client_app(task="segmentation")
classification_app = make_client_app(task="classification")

__all__ = [
    "app",
    "classification_app",
    "make_bundle_client_app",
    "make_client_app",
    "segmentation_app",
]
