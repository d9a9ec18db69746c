"""Expert suites: a backbone, its fine-tuned experts, fixed per-task heads and evaluation data.

The embedded **MiniSuite** (``assets/minisuite``) reproduces the merging papers' setting offline: one small
pretrained open_clip ViT (``MiniCLIP-ViT``), eight experts fine-tuned from it on eight procedural tasks with the
task's zero-shot head frozen, and uint8 validation/test splits. ``python -m studio.suite.build`` regenerates it.

Example:
    >>> from studio.suite import default_suite          # doctest: +SKIP
    >>> suite = default_suite()                         # doctest: +SKIP
    >>> suite.task_names                                # doctest: +SKIP
    ['digits', 'house_numbers', 'signs', 'landcover', 'aerial_scenes', 'textures', 'vehicles', 'scenes']
"""

from .core import (DEFAULT_SUITE_PATH, EMBEDDED_SUITE, SPLIT_NAMES, EmptySplitError, Suite, SuiteError, Task,
                   UnknownTaskError, default_suite, load_suite)
from .model import ArchitectureError, CharTokenizer, register_model_configs

__all__ = [
    "DEFAULT_SUITE_PATH", "EMBEDDED_SUITE", "SPLIT_NAMES", "Suite", "Task", "load_suite", "default_suite",
    "SuiteError", "UnknownTaskError", "EmptySplitError", "ArchitectureError", "CharTokenizer",
    "register_model_configs",
]
