"""Loading targets and running them."""

from leapdecode.models.load import load_model

__all__ = ["load_model"]
