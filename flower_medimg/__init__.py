"""flower-medimg: federated learning for medical imaging on Flower and MONAI."""

import logging as _logging

# Opacus calls ``logging.basicConfig`` when imported (opacus.utils.module_utils),
# which gives the root logger a handler and prints every Flower log line twice.
# Import it once here and put the root logger's handlers back as they were.
_root_handlers = list(_logging.getLogger().handlers)
import opacus.utils.module_utils  # noqa: E402, F401

_logging.getLogger().handlers[:] = _root_handlers

__version__ = "0.1.0"
