"""Synthetic data: StreetHazards-layout scenes, ADE20k-layout negatives and drive rosbags.

Torch-free (numpy, OpenCV, rosbags), so the runtime tests use it to make their test bags. The
names below are loaded on first use, so `anomaly-seg synth --help` (which imports
`training.synth.command`, and with it this package) loads none of the generators.
"""

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    'GENERATOR_VERSION': 'training.synth.dataset',
    'render_preview': 'training.synth.preview',
    'write_bag': 'training.synth.bag',
    'write_dataset': 'training.synth.dataset',
    'write_negatives': 'training.synth.negatives',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
