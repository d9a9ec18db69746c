"""Merging methods and calibrations: one file per method, each registering itself on import."""

from . import (  # noqa: F401
    weight_average,
    task_arithmetic,
)
