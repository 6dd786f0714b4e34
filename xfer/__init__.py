"""xfer: transfer-learning and adversarial-transfer studies as one resumable Ray Tune grid, recorded in MLflow."""

from xfer.errors import XferError

__version__ = "0.1.0"
__all__ = ["XferError", "__version__"]
