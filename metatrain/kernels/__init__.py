"""Custom kernels: the fused output projection + cross entropy used by the joint loss.

Only the public entry points live here; see `cross_entropy.py` for the implementations.
"""

from metatrain.kernels.cross_entropy import IMPLS, BlockSizes, LossSharding, fused_cross_entropy

__all__ = ["IMPLS", "BlockSizes", "LossSharding", "fused_cross_entropy"]
