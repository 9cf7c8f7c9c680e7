"""How a camera frame is fitted to the artifact's static input size, and the outputs mapped back.

The one resize rule of the project: the node, replay, evaluate, threshold calibration and
build-engine all call `plan_fit` + `fit_image` on the way in and `unfit` on the way out.

Modes (`RESIZE_MODES`), for a source of h x w pixels and a network input of H x W:
- ``letterbox`` (default): scale by min(H/h, W/w), keep the aspect ratio, centre the picture
  and fill the bars (`PAD_MODES`: the picture mirrored at its edges, or the artifact's pad
  colour). Every source pixel is seen; outputs in the bars are dropped.
- ``crop_center``: scale by max(H/h, W/w) and cut the centre: no bars, but the source's outer
  rows or columns are never seen (label void, score NaN there).
- ``stretch``: resize to H x W, ignoring the aspect ratio.
Where the aspect ratios differ by at most `ASPECT_TOLERANCE` (relative), every mode stretches:
the distortion is below what letterbox bars would cost.

Images shrink with area averaging and grow bilinearly; labels always use nearest neighbour.
numpy and OpenCV only.
"""

from dataclasses import dataclass

import cv2
import numpy as np

from anomaly_seg_node.artifact import DEFAULT_PAD_MODE, PAD_MODES
from anomaly_seg_node.errors import ConfigError

RESIZE_MODES = ('letterbox', 'crop_center', 'stretch')
DEFAULT_RESIZE_MODE = 'letterbox'
ASPECT_TOLERANCE = 0.05
# How letterbox bars are filled (artifact.PAD_MODES). 'reflect' mirrors the picture at its edges
# (OpenCV's BORDER_REFLECT_101): the network's pooled context (SwiftNet's SPP) then sees
# road-scene statistics instead of a flat block: closed mIoU of the session-8 16:9 demo artifact
# on CamVid's 4:3 frames 59.5 -> 62.1 on val, 48.1 -> 49.9 on test. 'constant' fills with one
# colour (pad_rgb), DEFAULT_PAD_MODE: artifacts exported before the sidecar named a mode were
# calibrated that way.
INTERPOLATIONS = {'nearest': cv2.INTER_NEAREST_EXACT, 'linear': cv2.INTER_LINEAR}

Box = tuple[int, int, int, int]  # top, left, height, width


@dataclass(frozen=True)
class Fit:
    """The source region `src_box` is resized onto the network region `net_box`.

    Source pixels outside `src_box` are not seen (crop_center); network pixels outside `net_box`
    are padding (letterbox).
    """

    src_hw: tuple[int, int]
    net_hw: tuple[int, int]
    mode: str  # the mode applied: 'stretch' also when the requested one was within tolerance
    requested: str
    src_box: Box
    net_box: Box

    @property
    def identity(self) -> bool:
        """The frame goes in as it is (same size, nothing cut or padded)."""
        return self.src_hw == self.net_hw

    @property
    def aspect_difference(self) -> float:
        """|aspect(src) / aspect(net) - 1|."""
        return aspect_difference(self.src_hw, self.net_hw)

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): network pixels per source pixel."""
        return (self.net_box[2] / self.src_box[2], self.net_box[3] / self.src_box[3])

    def describe(self) -> str:
        """One line for logs: what happens to a frame of this size."""
        (h, w), (nh, nw) = self.src_hw, self.net_hw
        if self.identity:
            return f'{h}x{w} frames match the artifact input {nh}x{nw}'
        if self.mode == 'stretch':
            return (f'{h}x{w} frames are resized to {nh}x{nw} (aspect differs by '
                    f'{100 * self.aspect_difference:.1f}%)')
        top, left, bh, bw = self.net_box
        if self.mode == 'letterbox':
            return (f'{h}x{w} frames are letterboxed into {nh}x{nw}: the picture fills '
                    f'{bh}x{bw} at row {top}, column {left}; the bars are padding')
        top, left, bh, bw = self.src_box
        return (f'{h}x{w} frames are cut to their centre {bh}x{bw} (rows {top}..{top + bh - 1}, '
                f'columns {left}..{left + bw - 1}) and resized to {nh}x{nw}; the rest is not '
                'seen')


def aspect_difference(src_hw: tuple[int, int], net_hw: tuple[int, int]) -> float:
    """|(w/h) / (W/H) - 1| of a source and a network size."""
    (h, w), (nh, nw) = src_hw, net_hw
    return abs((w / h) / (nw / nh) - 1.0)


def check_resize_mode(mode: str) -> str:
    """`mode` when it is one of RESIZE_MODES, else ConfigError."""
    if not isinstance(mode, str) or mode not in RESIZE_MODES:
        raise ConfigError(f'resize_mode must be one of {", ".join(RESIZE_MODES)}, got {mode!r}')
    return mode


def check_pad_mode(mode: str) -> str:
    """`mode` when it is one of PAD_MODES, else ConfigError."""
    if not isinstance(mode, str) or mode not in PAD_MODES:
        raise ConfigError(f'pad_mode must be one of {", ".join(PAD_MODES)}, got {mode!r}')
    return mode


def aspect_warning(fit: Fit) -> str | None:
    """What to tell the user when the source and network aspect ratios differ by more than
    ASPECT_TOLERANCE: both sizes and ratios, what `fit` does and how to choose otherwise."""
    if fit.aspect_difference <= ASPECT_TOLERANCE:
        return None
    (h, w), (nh, nw) = fit.src_hw, fit.net_hw
    others = ', '.join(m for m in RESIZE_MODES if m != fit.requested)
    return (f'the frames are {h}x{w} (aspect {w / h:.3f}) but the artifact input is {nh}x{nw} '
            f'(aspect {nw / nh:.3f}), {100 * fit.aspect_difference:.1f}% apart; resize_mode '
            f'{fit.requested}: {fit.describe()}. Choose another with the node parameter '
            f'resize_mode or replay --resize-mode ({others}), or export the artifact at the '
            "camera's aspect ratio (anomaly-seg export --size HxW)")


def plan_fit(src_hw: tuple[int, int], net_hw: tuple[int, int],
             mode: str = DEFAULT_RESIZE_MODE) -> Fit:
    """How a frame of `src_hw` = (h, w) goes into a network input of `net_hw` = (H, W)."""
    check_resize_mode(mode)
    h, w = (int(v) for v in src_hw)
    nh, nw = (int(v) for v in net_hw)
    if min(h, w, nh, nw) < 1:
        raise ConfigError(f'sizes must be positive, got source {src_hw} and network {net_hw}')
    full_src, full_net = (0, 0, h, w), (0, 0, nh, nw)
    applied = mode
    if mode == 'stretch' or aspect_difference((h, w), (nh, nw)) <= ASPECT_TOLERANCE:
        return Fit((h, w), (nh, nw), 'stretch', mode, full_src, full_net)
    if mode == 'letterbox':
        s = min(nh / h, nw / w)
        bh, bw = min(nh, max(1, round(h * s))), min(nw, max(1, round(w * s)))
        net_box = ((nh - bh) // 2, (nw - bw) // 2, bh, bw)
        return Fit((h, w), (nh, nw), applied, mode, full_src, net_box)
    s = max(nh / h, nw / w)
    bh, bw = min(h, max(1, round(nh / s))), min(w, max(1, round(nw / s)))
    src_box = ((h - bh) // 2, (w - bw) // 2, bh, bw)
    return Fit((h, w), (nh, nw), applied, mode, src_box, full_net)


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """RGB (or grey) uint8 -> size_hw: area averaging to shrink, bilinear to grow."""
    height, width = size_hw
    if image.shape[:2] == (height, width):
        return np.ascontiguousarray(image)
    shrink = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(np.ascontiguousarray(image), (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def fit_image(image: np.ndarray, fit: Fit, pad_rgb: tuple[int, int, int] = (0, 0, 0),
              pad_mode: str = DEFAULT_PAD_MODE) -> np.ndarray:
    """A source frame uint8 [h, w, 3] -> the network input uint8 [H, W, 3] of `fit`; letterbox
    bars are the picture mirrored (`pad_mode` 'reflect') or `pad_rgb` ('constant')."""
    _check_shape(image, fit.src_hw, 'frame')
    check_pad_mode(pad_mode)
    top, left, bh, bw = fit.src_box
    content = resize_image(image[top:top + bh, left:left + bw], fit.net_box[2:])
    if fit.net_box[2:] == fit.net_hw:
        return content
    if pad_mode == 'reflect':
        (nh, nw), (top, left, bh, bw) = fit.net_hw, fit.net_box
        return cv2.copyMakeBorder(content, top, nh - top - bh, left, nw - left - bw,
                                  cv2.BORDER_REFLECT_101)
    canvas = np.empty((*fit.net_hw, 3), dtype=np.uint8)
    canvas[:] = np.asarray(pad_rgb, dtype=np.uint8)
    top, left, bh, bw = fit.net_box
    canvas[top:top + bh, left:left + bw] = content
    return canvas


def fit_labels(labels: np.ndarray, fit: Fit, fill: int) -> np.ndarray:
    """A source label map [h, w] -> the network frame [H, W] (nearest); padding = `fill`."""
    _check_shape(labels, fit.src_hw, 'label map')
    top, left, bh, bw = fit.src_box
    content = _resize(labels[top:top + bh, left:left + bw], fit.net_box[2:], 'nearest')
    if fit.net_box[2:] == fit.net_hw:
        return content
    canvas = np.full(fit.net_hw, fill, dtype=labels.dtype)
    top, left, bh, bw = fit.net_box
    canvas[top:top + bh, left:left + bw] = content
    return canvas


def unfit(array: np.ndarray, fit: Fit, interpolation: str, fill: float | int) -> np.ndarray:
    """A network output [H, W] -> the source frame [h, w]: the padding is dropped, the content
    resized (`interpolation` 'nearest' for labels, 'linear' for scores) and source pixels the
    network never saw are `fill`."""
    _check_shape(array, fit.net_hw, 'network output')
    top, left, bh, bw = fit.net_box
    content = _resize(array[top:top + bh, left:left + bw], fit.src_box[2:], interpolation)
    if fit.src_box[2:] == fit.src_hw:
        return content
    canvas = np.full(fit.src_hw + array.shape[2:], fill, dtype=array.dtype)
    top, left, bh, bw = fit.src_box
    canvas[top:top + bh, left:left + bw] = content
    return canvas


def network_mask(fit: Fit) -> np.ndarray:
    """bool [H, W]: True where the network sees the picture, False on padding."""
    mask = np.zeros(fit.net_hw, dtype=bool)
    top, left, bh, bw = fit.net_box
    mask[top:top + bh, left:left + bw] = True
    return mask


def _resize(array: np.ndarray, size_hw: tuple[int, int], interpolation: str) -> np.ndarray:
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f'interpolation must be one of {sorted(INTERPOLATIONS)}, got '
                          f'{interpolation!r}')
    height, width = size_hw
    if array.shape[:2] == (height, width):
        return np.ascontiguousarray(array)
    return cv2.resize(np.ascontiguousarray(array), (width, height),
                      interpolation=INTERPOLATIONS[interpolation])


def _check_shape(array: np.ndarray, hw: tuple[int, int], what: str) -> None:
    if tuple(array.shape[:2]) != tuple(hw):
        raise ConfigError(f'the {what} is {array.shape[0]}x{array.shape[1]} but this fit was '
                          f'planned for {hw[0]}x{hw[1]}; plan a fit for each frame size')
