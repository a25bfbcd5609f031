"""Full-rank training with AdamW: the reference every other method is compared against."""

from __future__ import annotations

from lrpretrain.methods import register_method
from lrpretrain.methods.base import Method


@register_method("full")
class Full(Method):
    """Every hook keeps its default: all parameters trained with AdamW."""
