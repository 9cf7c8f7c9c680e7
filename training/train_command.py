"""`anomaly-seg train`: one of the paper's methods, stage-1 closed-set training or flow
pretraining, from a YAML config with `key=value` overrides (training/train.py does the work).

Multi-process (DDP) training goes through torchrun, which starts one process per GPU (or CPU
process with gloo) and sets the env:// rendezvous variables, e.g. on one machine:

    torchrun --nproc_per_node 4 -m training.train --config training/configs/densehybrid.yaml

and on several machines add --nnodes, --node_rank and --rdzv_endpoint (torchrun's job).
`train.batch_size` is the global batch, split evenly over the processes.
"""

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `anomaly-seg train` (no torch import here)."""
    parser.add_argument('--config', help='YAML config, e.g. training/configs/densehybrid.yaml '
                        '(optional with --resume CKPT: the stored config is used)')
    parser.add_argument('overrides', nargs='*', metavar='KEY=VALUE',
                        help='config overrides such as optim.lr=1e-4 train.max_steps=100')
    parser.add_argument('--out', help="output folder (default: the config's train.out_dir)")
    parser.add_argument('--resume', metavar='CKPT|auto',
                        help='continue from a checkpoint, or from the newest one in the output '
                        'folder (auto; starts fresh when there is none)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns the run summary (final checkpoint, steps, last losses and validation)."""
    from training.train import run_from_args
    return run_from_args(args)
