"""Synthetic data: StreetHazards-layout scenes, ADE20k-layout negatives and drive rosbags.

Torch-free (numpy, OpenCV, rosbags), so the runtime tests use it to make their test bags.
"""

from training.synth.bag import write_bag
from training.synth.dataset import GENERATOR_VERSION, write_dataset
from training.synth.negatives import write_negatives
from training.synth.preview import render_preview

__all__ = ['GENERATOR_VERSION', 'render_preview', 'write_bag', 'write_dataset',
           'write_negatives']
