"""One camera frame -> the node's outputs, in numpy and OpenCV (shared by the node and replay).

Frame (RGB uint8) -> optional crop -> fitted to the segmenter's input size by ``resize_mode``
(:mod:`anomaly_seg_node.imaging`: letterbox, crop_center or stretch) -> segmenter -> outputs at
``output_resolution``:

- ``'input'``: the frame's full size; labels mapped back nearest, scores bilinear, letterbox bars
  dropped, the crop undone. Pixels the crop or crop_center cut away were never seen: label
  ``void_id``, score NaN ("not evaluated", so never above any threshold), anomaly mask 0, colour
  black, overlay = the frame untouched.
- ``'network'``: the segmenter's size; letterbox bars are void / NaN and the overlay is drawn on
  the fitted network frame. Publish a CameraInfo scaled with :func:`scale_camera_info` beside it.

Only the requested outputs (and what they need) are computed. ``FramePipeline.process`` is
``render(infer(prepare(frame)))``: the node's worker may run the three steps on three threads, so
that the host work of one frame overlaps the inference of another.
"""

from collections.abc import Callable, Iterable, Sequence
import dataclasses
import math
import time
from typing import Any

import cv2
import numpy as np

from anomaly_seg_node import imaging
from anomaly_seg_node.backends import SegmenterProtocol
from anomaly_seg_node.errors import BackendError, ConfigError, ImageDecodeError

OUTPUTS = ('semantic_mask', 'anomaly_score', 'anomaly_mask', 'semantic_color', 'overlay')
# sensor_msgs/Image encoding of each output (the node's topics, the replay's bag, the bench).
ENCODINGS = {'semantic_mask': 'mono8', 'anomaly_score': '32FC1', 'anomaly_mask': 'mono8',
             'semantic_color': 'rgb8', 'overlay': 'rgb8'}
RESOLUTIONS = ('input', 'network')
# What each output needs at output resolution: labels, scores.
_NEEDS_LABELS = {'semantic_mask', 'semantic_color', 'overlay'}
_NEEDS_SCORES = {'anomaly_score', 'anomaly_mask', 'overlay'}
_MAX_FITS = 16  # frame sizes whose fit is cached (and warned about); a camera has one


@dataclasses.dataclass
class FrameResult:
    """The outputs of one frame; an output that was not requested is None."""

    semantic_mask: np.ndarray | None = None  # uint8 [H, W], void_id = void
    anomaly_score: np.ndarray | None = None  # float32 [H, W], higher = anomalous, NaN = unseen
    anomaly_mask: np.ndarray | None = None  # uint8 [H, W], 255 where score > threshold
    semantic_color: np.ndarray | None = None  # uint8 [H, W, 3] RGB
    overlay: np.ndarray | None = None  # uint8 [H, W, 3] RGB
    threshold: float = math.nan
    timings_ms: dict[str, float] = dataclasses.field(default_factory=dict)


class _Clock:
    """Laps of one frame's stages; ``total`` is their sum, the time the frame was worked on
    (stages on different threads leave gaps between them, which are not counted)."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.perf_counter()
        self.busy_s = 0.0

    def resume(self) -> None:
        """Start the next lap now (a stage picking the frame up)."""
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.busy_s += now - self.last
        self.timings[stage] = (now - self.last) * 1e3
        self.last = now

    def total(self) -> float:
        return self.busy_s * 1e3


@dataclasses.dataclass
class PreparedFrame:
    """A frame cropped and fitted to the segmenter's input (``FramePipeline.prepare``)."""

    frame: np.ndarray  # uint8 [H, W, 3] RGB, as given
    net_frame: np.ndarray  # uint8 [h, w, 3] RGB at the segmenter's input size
    want: frozenset[str]
    fit: imaging.Fit
    seen: np.ndarray | None  # bool [h, w]: False on letterbox bars; None: all seen
    alpha: float  # the frame's overlay_alpha (its threshold is result.threshold)
    result: FrameResult  # filled by render; timings so far
    clock: _Clock


@dataclasses.dataclass
class InferredFrame:
    """A prepared frame with the segmenter's answer (``FramePipeline.infer``)."""

    prepared: PreparedFrame
    labels: np.ndarray  # int [h, w]
    scores: np.ndarray  # float [h, w]


class FramePipeline:
    """Crop, fit, segment and render one frame; threshold and alpha may change at run time.

    ``crop`` = pixels cut from the (top, bottom, left, right) edges, e.g. (0, 120, 0, 0) removes
    a bonnet in the bottom 120 rows. ``palette[i]`` is the RGB colour of class ``i``.
    ``resize_mode`` fits the cropped frame to the segmenter's input (``imaging.RESIZE_MODES``),
    letterbox bars are filled by ``pad_mode`` ('reflect': the picture mirrored; 'constant':
    ``pad_rgb``), the sidecar's. ``on_warning`` is called once
    per cropped frame size whose aspect ratio differs from the segmenter's by more than
    ``imaging.ASPECT_TOLERANCE``, with a message saying what the mode does and how to change it.
    """

    def __init__(self, segmenter: SegmenterProtocol, classes: Sequence[str],
                 palette: Sequence[Sequence[int]], void_id: int = 255,
                 crop: Sequence[int] | None = None, output_resolution: str = 'input',
                 threshold: float = 0.0, overlay_alpha: float = 0.5,
                 anomaly_color: Sequence[int] = (0, 255, 255),
                 resize_mode: str = imaging.DEFAULT_RESIZE_MODE,
                 pad_rgb: Sequence[int] = (0, 0, 0),
                 pad_mode: str = imaging.DEFAULT_PAD_MODE,
                 on_warning: Callable[[str], None] | None = None) -> None:
        size = tuple(int(v) for v in segmenter.input_size)
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f'segmenter.input_size must be (H, W) > 0, got {size}')
        self.segmenter = segmenter
        self.input_size: tuple[int, int] = (size[0], size[1])
        if len(palette) != len(classes):
            raise ConfigError(
                f'{len(classes)} class names but {len(palette)} palette colours; the sidecar '
                'must give one colour per class')
        if not 0 <= void_id <= 255 or void_id < len(classes):
            raise ConfigError(
                f'void_id {void_id} must be in [{len(classes)}, 255] (above every class id) so '
                'the semantic mask fits mono8')
        self.classes = list(classes)
        self.void_id = int(void_id)
        self.lut = np.zeros((256, 3), dtype=np.uint8)  # label -> RGB; void and unknown: black
        for i, colour in enumerate(palette):
            self.lut[i] = _rgb(colour, f'palette[{i}]')
        self._packed_lut = pack_lut(self.lut)
        self.anomaly_color = _rgb(anomaly_color, 'anomaly_color')
        self.crop = check_crop(crop, optional=True)
        if output_resolution not in RESOLUTIONS:
            raise ConfigError(
                f'output_resolution must be one of {RESOLUTIONS}, got {output_resolution!r}')
        self.output_resolution = output_resolution
        self.resize_mode = imaging.check_resize_mode(resize_mode)
        pad = _rgb(pad_rgb, 'pad_rgb')
        self.pad_rgb: tuple[int, int, int] = (int(pad[0]), int(pad[1]), int(pad[2]))
        self.pad_mode = imaging.check_pad_mode(pad_mode)
        self.on_warning = on_warning
        self.threshold = threshold
        self.overlay_alpha = overlay_alpha
        # cropped (h, w) -> its Fit and, when it has letterbox bars, its network_mask.
        self._fits: dict[tuple[int, int], tuple[imaging.Fit, np.ndarray | None]] = {}
        self._warned: set[tuple[int, int]] = set()

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f'anomaly threshold must be a finite number, got {value}')
        self._threshold = value

    @property
    def overlay_alpha(self) -> float:
        return self._alpha

    @overlay_alpha.setter
    def overlay_alpha(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f'overlay_alpha must be in [0, 1], got {value}')
        self._alpha = value

    def seen_mask(self, frame_hw: tuple[int, int]) -> np.ndarray | None:
        """bool at the output resolution of a frame of ``frame_hw`` = (h, w): True where the
        outputs hold the model's answer, False where it never saw the picture (the crop,
        crop_center's cut, letterbox bars at network resolution); None when it is True
        everywhere."""
        top, bottom, left, right = self.crop
        height, width = (int(v) for v in frame_hw)
        fit, seen = self._plan((height - top - bottom, width - left - right))
        if self.output_resolution == 'network':
            return None if seen is None else seen.copy()
        if not any(self.crop) and fit.src_box[2:] == fit.src_hw:
            return None
        mask = np.zeros((height, width), dtype=bool)
        box_top, box_left, box_h, box_w = fit.src_box
        mask[top + box_top:top + box_top + box_h, left + box_left:left + box_left + box_w] = True
        return mask

    def _plan(self, cropped_hw: tuple[int, int]) -> tuple[imaging.Fit, np.ndarray | None]:
        """The fit of a cropped frame size, planned (and warned about) once per size."""
        key = (int(cropped_hw[0]), int(cropped_hw[1]))
        plan = self._fits.get(key)
        if plan is not None:
            return plan
        fit = imaging.plan_fit(key, self.input_size, self.resize_mode)
        seen = None if fit.net_box[2:] == fit.net_hw else imaging.network_mask(fit)
        if len(self._fits) >= _MAX_FITS:
            self._fits.clear()
        self._fits[key] = plan = (fit, seen)
        message = imaging.aspect_warning(fit)
        if (message is not None and self.on_warning is not None and key not in self._warned
                and len(self._warned) < _MAX_FITS):
            self._warned.add(key)
            if any(self.crop):
                message = f'after the crop {self.crop} (top, bottom, left, right): {message}'
            self.on_warning(message)
        return plan

    def process(self, rgb_frame: np.ndarray, want: Iterable[str] = OUTPUTS) -> FrameResult:
        """Run the segmenter on one RGB uint8 ``[H, W, 3]`` frame and render ``want``."""
        return self.render(self.infer(self.prepare(rgb_frame, want)))

    def prepare(self, rgb_frame: np.ndarray, want: Iterable[str] = OUTPUTS) -> PreparedFrame:
        """Check, crop and fit one frame to the segmenter's input; the threshold and overlay
        alpha of the frame are read here. ``process`` = ``render(infer(prepare(...)))``; the
        three may run on different threads, one frame at a time each."""
        want = set(want)
        unknown = want - set(OUTPUTS)
        if unknown:
            raise ConfigError(f'unknown outputs {sorted(unknown)}; expected some of {OUTPUTS}')
        frame = np.asarray(rgb_frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ImageDecodeError(
                f'the pipeline takes RGB uint8 [H, W, 3] frames, got {frame.dtype} '
                f'{frame.shape}; decode messages with image_codec first')
        threshold, alpha = self._threshold, self._alpha  # one value per frame
        result = FrameResult(threshold=threshold)
        clock = _Clock(result.timings_ms)

        top, bottom, left, right = self.crop
        full_h, full_w = frame.shape[:2]
        crop_h, crop_w = full_h - top - bottom, full_w - left - right
        if crop_h < 1 or crop_w < 1:
            raise ConfigError(
                f'crop {self.crop} (top, bottom, left, right) leaves nothing of a '
                f'{full_h} x {full_w} frame; reduce the crop')
        cropped = frame[top:full_h - bottom, left:full_w - right]
        fit, seen = self._plan((crop_h, crop_w))
        net_frame = imaging.fit_image(cropped, fit, self.pad_rgb, self.pad_mode)
        clock.lap('resize')
        return PreparedFrame(frame=frame, net_frame=net_frame, want=frozenset(want), fit=fit,
                             seen=seen, alpha=alpha, result=result, clock=clock)

    def infer(self, prepared: PreparedFrame) -> InferredFrame:
        """Run the segmenter on a prepared frame: labels and scores at its input size."""
        prepared.clock.resume()
        out = self.segmenter(prepared.net_frame)
        labels = _single(out, 'labels', self.input_size)
        scores = _single(out, 'anomaly_score', self.input_size)
        prepared.clock.lap('infer')
        return InferredFrame(prepared, labels, scores)

    def render(self, inferred: InferredFrame) -> FrameResult:
        """The requested outputs of an inferred frame at ``output_resolution``."""
        prepared, labels, scores = inferred.prepared, inferred.labels, inferred.scores
        frame, want, result, clock = prepared.frame, prepared.want, prepared.result, prepared.clock
        threshold, alpha = result.threshold, prepared.alpha
        if not want:
            return result
        clock.resume()

        labels8 = None
        if want & _NEEDS_LABELS:
            labels8 = self._labels_uint8(labels)
        scores32 = scores.astype(np.float32, copy=False) if want & _NEEDS_SCORES else None
        clock.lap('labels')

        top, bottom, left, right = self.crop
        full_h, full_w = frame.shape[:2]
        fit, seen = prepared.fit, prepared.seen
        if self.output_resolution == 'input':
            region = (top, left, full_h - top - bottom, full_w - left - right)
            if labels8 is not None:
                labels8 = _place(imaging.unfit(labels8, fit, 'nearest', self.void_id),
                                 (full_h, full_w), region, self.void_id)
            if scores32 is not None:
                scores32 = _place(imaging.unfit(scores32, fit, 'linear', np.nan),
                                  (full_h, full_w), region, np.nan)
            base = frame
        else:
            if seen is not None:  # letterbox bars were never part of the picture
                if labels8 is not None:
                    labels8 = np.where(seen, labels8, np.uint8(self.void_id))
                if scores32 is not None:
                    scores32 = np.where(seen, scores32, np.float32(np.nan))
            base = prepared.net_frame
            if seen is not None and self.pad_mode == 'reflect' and 'overlay' in want:
                # Bars drawn flat: a mirror image there would look like scene without outputs.
                base = np.where(seen[..., None], base, np.asarray(self.pad_rgb, np.uint8))
        clock.lap('upsample')

        anomaly: np.ndarray | None = None
        if scores32 is not None and want & {'anomaly_mask', 'overlay'}:
            anomaly = np.asarray(scores32 > threshold)  # NaN (unseen) compares False
            if 'anomaly_mask' in want:
                mask = anomaly.view(np.uint8)
                result.anomaly_mask = mask * np.uint8(255)
        clock.lap('threshold')

        colour = None
        if labels8 is not None and want & {'semantic_color', 'overlay'}:
            colour = colour_lookup(self._packed_lut, labels8)
        clock.lap('colour')

        if 'overlay' in want and labels8 is not None and colour is not None \
                and anomaly is not None:
            base = np.ascontiguousarray(base)
            overlay = cv2.addWeighted(base, 1.0 - alpha, colour, alpha, 0.0)
            overlay = copy_where(base, labels8 == self.void_id, overlay)
            overlay[anomaly] = self.anomaly_color
            result.overlay = overlay
        clock.lap('overlay')

        if 'semantic_mask' in want:
            result.semantic_mask = labels8
        if 'anomaly_score' in want:
            result.anomaly_score = scores32
        if 'semantic_color' in want:
            result.semantic_color = colour
        result.timings_ms['total'] = clock.total()
        return result

    def _labels_uint8(self, labels: np.ndarray) -> np.ndarray:
        """int32 or uint8 class ids -> uint8; ids outside [0, K) other than void_id become
        void_id. uint8 labels in range are returned as they are, without a copy."""
        lo, hi = int(labels.min()), int(labels.max())
        if lo >= 0 and hi < len(self.classes):
            return labels.astype(np.uint8, copy=False)
        bad = ((labels < 0) | (labels >= len(self.classes))) & (labels != self.void_id)
        return np.where(bad, self.void_id, labels).astype(np.uint8)


def scale_camera_info(k: Sequence[float], p: Sequence[float], width: int, height: int,
                      crop: Sequence[int] | None, new_size: tuple[int, int],
                      resize_mode: str = 'stretch') -> tuple[np.ndarray, np.ndarray]:
    """K (3x3) and P (3x4) of the ``'network'`` outputs, flat float64 like CameraInfo's k and p.

    Like image_proc: the crop shifts the principal point (crop_decimate's ROI offset), then the
    fit of the cropped frame to ``new_size`` = (H, W) by ``resize_mode`` (the pipeline's; the
    default 'stretch' is the mapping of releases without resize_mode): crop_center shifts it by
    the cut, the resize multiplies fx, skew, cx, Tx by the horizontal and fy, cy, Ty by the
    vertical scale of the picture, and letterbox adds the offset of the bars to cx and cy.
    """
    top, bottom, left, right = check_crop(crop, optional=True)
    crop_w, crop_h = int(width) - left - right, int(height) - top - bottom
    if crop_w < 1 or crop_h < 1:
        raise ConfigError(f'crop {crop} leaves nothing of a {height} x {width} camera')
    new_h, new_w = (int(v) for v in new_size)
    if new_h < 1 or new_w < 1:
        raise ConfigError(f'new_size must be (H, W) > 0, got {new_size}')
    k_out = np.array(k, dtype=np.float64).reshape(-1)
    p_out = np.array(p, dtype=np.float64).reshape(-1)
    if k_out.size != 9 or p_out.size != 12:
        raise ConfigError(f'K needs 9 values and P 12, got {k_out.size} and {p_out.size}')
    fit = imaging.plan_fit((crop_h, crop_w), (new_h, new_w), resize_mode)
    sy, sx = fit.scale
    cut_top, cut_left = top + fit.src_box[0], left + fit.src_box[1]
    bar_top, bar_left = fit.net_box[0], fit.net_box[1]
    k_out[2] = (k_out[2] - cut_left) * sx + bar_left
    k_out[5] = (k_out[5] - cut_top) * sy + bar_top
    p_out[2] = (p_out[2] - cut_left) * sx + bar_left
    p_out[6] = (p_out[6] - cut_top) * sy + bar_top
    k_out[[0, 1]] *= sx
    k_out[4] *= sy
    p_out[[0, 1, 3]] *= sx
    p_out[[5, 7]] *= sy
    return k_out, p_out


def _single(out: Any, name: str, size: tuple[int, int]) -> np.ndarray:
    """``out.<name>`` [1, H, W] or [H, W] -> [H, W], checked against the segmenter's size."""
    value = getattr(out, name, None)
    if value is None:
        raise BackendError(f'the segmenter returned no {name!r}; expected labels and '
                           'anomaly_score [N, H, W]')
    value = np.asarray(value)
    if value.ndim == 3 and value.shape[0] == 1:
        value = value[0]
    if value.shape != size:
        raise BackendError(
            f'the segmenter returned {name} of shape {value.shape}; expected [1, {size[0]}, '
            f'{size[1]}] for its input_size')
    return value


def _place(image: np.ndarray, full: tuple[int, int], region: tuple[int, int, int, int],
           fill: float) -> np.ndarray:
    """Paste the cropped region's output back into a frame-sized array filled with ``fill``."""
    top, left, height, width = region
    if image.shape[:2] == full:
        return image
    canvas = np.full(full + image.shape[2:], fill, dtype=image.dtype)
    canvas[top:top + height, left:left + width] = image
    return canvas


def check_crop(value: Any, name: str = 'crop', optional: bool = False
               ) -> tuple[int, int, int, int]:
    """``value`` as (top, bottom, left, right) pixels cut from the edges, or a ConfigError
    naming ``name`` (the node says 'parameter crop'); None is no crop when ``optional``."""
    if value is None and optional:
        return (0, 0, 0, 0)
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ConfigError(f'{name} must be 4 integers [top, bottom, left, right], got '
                          f'{value!r}')
    values = list(value)
    if len(values) != 4 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
            for v in values):
        raise ConfigError(
            f'{name} must be 4 non-negative integers [top, bottom, left, right] (pixels cut '
            f'from each edge), got {values!r}')
    top, bottom, left, right = (int(v) for v in values)
    return top, bottom, left, right


def pack_lut(lut: np.ndarray) -> np.ndarray:
    """A label -> RGB table uint8 [256, 3] as uint32 [256] (RGB + a zero byte per entry), for
    :func:`colour_lookup`."""
    padded = np.zeros((256, 4), dtype=np.uint8)
    padded[:, :3] = lut
    # A view of the bytes, so the channel order holds on any byte order.
    return padded.view(np.uint32).reshape(256)


def colour_lookup(packed_lut: np.ndarray, labels8: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] of uint8 labels [H, W] through a :func:`pack_lut` table.

    Bit-identical to ``np.take(lut, labels8, axis=0)``; one 4-byte gather per pixel and
    OpenCV's channel drop cost about a third of numpy's 3-byte row gather.
    """
    rgba = np.take(packed_lut, labels8).view(np.uint8).reshape(*labels8.shape, 4)
    return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)


def copy_where(src: np.ndarray, mask: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``dst`` [H, W, C] uint8 with the pixels of ``src`` where ``mask`` [H, W] (bool or uint8)
    is set: ``cv2.copyTo``, bit-identical to ``np.copyto(dst, src, where=mask[:, :, None])``
    and about ten times faster. Written in place (and returned) when ``dst`` is contiguous;
    use the returned array."""
    if mask.dtype == np.bool_:
        mask = mask.view(np.uint8)
    return cv2.copyTo(src, mask, dst)


def _rgb(colour: Sequence[int], name: str) -> np.ndarray:
    values = tuple(colour)
    if len(values) != 3 or not all(0 <= int(v) <= 255 for v in values):
        raise ConfigError(f'{name} must be an RGB triple of 0..255, got {colour!r}')
    return np.array(values, dtype=np.uint8)
