"""Optimizers (method plugins build them) and learning-rate schedules.

Every optimizer is a :class:`ParamwiseOptimizer`: its update is a set of independent per-parameter
steps, so the same code serves the global step and the per-layer (in-backward) step.
"""

from lrpretrain.optim.adamw import AdamW
from lrpretrain.optim.apollo import Apollo
from lrpretrain.optim.base import ParamwiseOptimizer
from lrpretrain.optim.fira import FiraAdamW
from lrpretrain.optim.frugal import FrugalAdamW
from lrpretrain.optim.galore import GaLoreAdamW
from lrpretrain.optim.loro import LOROAdamW
from lrpretrain.optim.schedule import lr_factor
from lrpretrain.optim.subspace import SubspaceAdam
from lrpretrain.optim.vectorwise import VectorwiseAdamW

__all__ = ["AdamW", "Apollo", "FiraAdamW", "FrugalAdamW", "GaLoreAdamW", "LOROAdamW", "ParamwiseOptimizer", "SubspaceAdam",
           "VectorwiseAdamW", "lr_factor"]
