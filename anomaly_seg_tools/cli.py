"""The `anomaly-seg` command: the one composition root of the project.

Subcommands live in small modules that expose `add_arguments(parser)` and `run(args) -> dict`.
Only the module of the subcommand on the command line is imported (none for `anomaly-seg
--help`), and those modules import nothing heavy at module level (torch, onnxruntime, training
code are imported inside `run`), so the help stays fast and the runtime side never needs torch.
This package, not `anomaly_seg_node`, may import `training`: the vehicle runtime never does.
"""

import argparse
from collections.abc import Iterable, Sequence
import importlib
import json
import sys
from typing import Any

from anomaly_seg_node.errors import AnomalySegError

# name -> (module, one-line help). Modules are imported only when their subcommand is built.
COMMANDS: dict[str, tuple[str, str]] = {
    'synth': ('training.synth.command',
              'write synthetic StreetHazards scenes, ADE20k-style negatives, a drive rosbag, or '
              'anomalies pasted into real CamVid frames'),
    'train': ('training.train_command',
              "train one of the paper's methods, stage-1 closed-set training or flow "
              'pretraining from a YAML config'),
    'evaluate': ('training.evaluate_command',
                 'Table I metrics of a checkpoint or artifact on a StreetHazards test split: '
                 'AP/FPR95/AUROC, closed and open mIoU, curves'),
    'export': ('training.export_command',
               'checkpoint (or --random-init) -> NAME.onnx, NAME.pt2, NAME.json with calibrated '
               'thresholds, checked against eager torch'),
    'bench': ('anomaly_seg_tools.bench',
              "frames per second per score graph and backend, and per-stage frame times (the "
              "paper's Table II)"),
    'replay': ('anomaly_seg_node.replay_command',
               'replay a rosbag through an artifact: metrics against a label topic, latency, '
               'dropped frames, overlay video, output bag'),
    'build-engine': ('anomaly_seg_node.build_engine',
                     'build, verify and cache the TensorRT engine of an artifact for this GPU '
                     '(takes minutes)'),
    'demo': ('anomaly_seg_tools.demo', "the newcomer's first run on the embedded default"),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommands in `commands` (default: all) get their flags, which
    imports their modules. The others are listed with their help line only."""
    wanted = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog='anomaly-seg',
        description='Open-set semantic segmentation with a dense anomaly score: synthetic data, '
                    'training, evaluation, export and rosbag replay.')
    parser.add_argument('--json', action='store_true',
                        help='print the result as JSON on stdout instead of a human summary')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name in wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_module=module)
    return parser


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one), if any."""
    for arg in argv:
        if arg == '--':
            return None
        if not arg.startswith('-'):
            return arg if arg in COMMANDS else None
    return None


def _is_override(arg: str) -> bool:
    return not arg.startswith('-') and '=' in arg


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; KEY=VALUE overrides may also follow a flag (`train ... --no-progress a=1`).

    argparse stops filling a nargs='*' positional at the first flag and would reject the
    overrides after it as unrecognised; commands with an `overrides` list take them all.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, 'overrides', None), list) and all(map(_is_override, extra)):
            args.overrides.extend(extra)
        else:
            parser.error(f'unrecognized arguments: {" ".join(extra)}')
    return args


def format_human(report: dict[str, Any], indent: int = 0) -> str:
    """Render a result dict as indented `key: value` lines."""
    lines = []
    pad = '  ' * indent
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f'{pad}{key}:')
            lines.append(format_human(value, indent + 1))
        elif isinstance(value, float):
            lines.append(f'{pad}{key}: {value:.6g}')
        else:
            lines.append(f'{pad}{key}: {value}')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    command = command_in(argv)
    parser = build_parser([] if command is None else [command])
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = args._module
    try:
        report = module.run(args)
    except AnomalySegError as error:
        print(f'anomaly-seg {args.command}: error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'anomaly-seg {args.command}: interrupted', file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        formatter = getattr(module, 'format_human', format_human)
        print(formatter(report))
    return 0


if __name__ == '__main__':
    sys.exit(main())
