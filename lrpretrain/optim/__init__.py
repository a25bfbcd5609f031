"""Optimizers (method plugins build them) and learning-rate schedules.

Every optimizer is a :class:`ParamwiseOptimizer`: its update is a set of independent per-parameter
steps, so the same code serves the global step and the per-layer (in-backward) step.
"""

from lrpretrain.optim.adamw import AdamW
from lrpretrain.optim.base import ParamwiseOptimizer
from lrpretrain.optim.schedule import lr_factor

__all__ = ["AdamW", "ParamwiseOptimizer", "lr_factor"]
