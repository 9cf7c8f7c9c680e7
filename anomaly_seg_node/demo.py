"""`anomaly-seg demo`: the newcomer's first run, end to end, on the embedded default.

Part of the command-line composition root (like cli.py): it wires the synthetic generator
(training.synth, torch-free) and the runtime's rosbag replay together, importing both lazily.

Steps: a synthetic drive bag -> a small synthetic StreetHazards set with a preview picture ->
replay of the bag through the demo artifact (models/demo.json) on the CPU with ONNX Runtime,
writing metrics, a summary and an overlay video. Without a demo artifact the replay step is
skipped and the report says how to make one.
"""

import argparse
from pathlib import Path
import sys
import time
from typing import Any

DEFAULT_ARTIFACT = Path(__file__).resolve().parents[1] / 'models' / 'demo.json'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.synth.command import size_arg

    parser.add_argument('--out', type=Path, default=Path('out/demo'),
                        help='output folder (default out/demo); replaced on each run')
    parser.add_argument('--frames', type=int, default=150,
                        help='frames of the synthetic drive (default 150)')
    parser.add_argument('--size', type=size_arg, default=(360, 640),
                        help='HxW of the drive and data set (default 360x640)')
    parser.add_argument('--artifact', type=Path, default=DEFAULT_ARTIFACT,
                        help=f'artifact sidecar to replay (default {DEFAULT_ARTIFACT})')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default 0)')


def run(args: argparse.Namespace) -> dict[str, Any]:
    from training.synth import render_preview, write_bag, write_dataset

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {'out': str(out)}

    print(f'[1/3] synthetic drive: {args.frames} frames of {args.size[0]}x{args.size[1]}',
          file=sys.stderr)
    bag = write_bag(out / 'drive_bag', frames=args.frames, size=args.size, storage='mcap',
                    encoding='rgb8', compressed=True, seed=args.seed, overwrite=True)
    report['bag'] = {'path': bag['out'], 'frames': args.frames, 'seconds': bag['seconds']}

    print('[2/3] synthetic StreetHazards set and preview', file=sys.stderr)
    data = write_dataset(out / 'dataset', train=6, val=2, test=4, size=args.size,
                         seed=args.seed, overwrite=True)
    preview = render_preview(out / 'dataset', out / 'preview.png', n=4)
    report['dataset'] = {'path': data['out'], 'preview': str(preview)}

    artifact = Path(args.artifact)
    if artifact.is_file():
        print(f'[3/3] replay through {artifact} (onnxruntime, CPU)', file=sys.stderr)
        report['replay'] = _replay(Path(bag['out']), artifact, out / 'replay')
    else:
        print(f'[3/3] skipped: no demo artifact at {artifact}', file=sys.stderr)
        report['replay'] = ('skipped: no artifact; train and export one (README "Quick start '
                            'without a data set"), then pass --artifact NAME.json')
    report['seconds'] = round(time.perf_counter() - start, 1)
    return report


def _replay(bag: Path, artifact: Path, out: Path) -> dict[str, Any]:
    from anomaly_seg_node import replay_command

    parser = argparse.ArgumentParser()
    replay_command.add_arguments(parser)
    args = parser.parse_args(['--bag', str(bag), '--artifact', str(artifact), '--out', str(out),
                              '--backend', 'onnxruntime', '--device', 'cpu', '--video'])
    return replay_command.run(args)
