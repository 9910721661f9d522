"""CAN: capsule attention network for cell type classification."""

from ._model import CAN
from ._module import CANModule, CapsuleExtractors

__all__ = ["CAN", "CANModule", "CapsuleExtractors"]
