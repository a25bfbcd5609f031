"""Optimizers (method plugins build them) and learning-rate schedules."""

from lrpretrain.optim.schedule import lr_factor

__all__ = ["lr_factor"]
