"""Anomaly objects for planners: "an unknown object of this size, here, this sure", per frame.

`find_objects(score, labels, params, fpr_table)` turns one anomaly score map (float32 [H, W],
higher = more anomalous, NaN = unseen) into a short list of `AnomalyObject`s, in this order:

1. threshold: the pixels with ``score > params.threshold``, as the node's anomaly mask. NaN
   compares False, so unseen pixels never belong to an object.
2. drivable restriction (when ``params.drivable_ids`` is not empty): only pixels whose semantic
   label is one of those ids, that region grown by ``params.drivable_margin`` pixels (a square
   dilation: within the margin in x and in y). The margin keeps the pixels of an object that
   stands on the road, which the segmenter labels as something else, next to the road pixels.
3. fragments: the 8-connected components of that mask (``cv2.connectedComponents``).
4. merge (when ``params.merge_distance`` k > 0): fragments whose gap is at most k pixels form
   one object, transitively. The gap of two fragments is the min over their pixel pairs of
   max(|dx|, |dy|) - 1, the background pixels between them (8-neighbours: gap 0). By dilation, not
   closing: the 8-connected components of the mask dilated by a (k + 1) x (k + 1) square,
   because two fragments dilated so touch exactly when their gap is at most k. The dilation
   only groups: an object's pixels are the original mask pixels of its fragments.
5. size: objects with fewer than ``min_area_px`` pixels, or fewer than ``min_area_fraction`` of
   the H * W pixels of the given map, are dropped.
6. count: at most ``max_objects``, the largest area first (ties: top-most, then left-most).

Confidence (`object_confidence`), a monotone map of the object's max score to [0, 1]:
- with an FPR table ``{score value: false-alarm rate}`` (e.g. `fpr_table_from_thresholds` of the
  sidecar's ``fpr1`` = 0.01 and ``fpr0.1`` = 0.001 thresholds): ``1 - FPR(max score)``, the FPR
  interpolated linearly in log10(FPR) between the points sorted by score and clamped to the
  end points outside them. It is one minus the share of inlier calibration pixels that score
  above the object's peak, a rank in calibrated units, not the probability that the object
  exists.
- without one: the logistic ``1 / (1 + exp(-(max score - threshold) / confidence_scale))``:
  0.5 at the threshold, 0.73 one scale above it, 0.95 about three scales above it. The scale is
  in score units of the artifact (default 1.0); prefer the table when the sidecar has one.

Cost: the labelling runs on the bounding box of the mask pixels, and every statistic (box,
area, scores, centroid) is a bincount or ufunc.at over the mask pixels alone, so a frame costs
a threshold, one labelling of that box and work in proportion to its anomalous pixels; about
2 to 3 ms at 720 x 1280 with ~1 % of the pixels above the threshold on a loaded 2-core CPU.
numpy and OpenCV only.

`detection_array` writes the objects of a frame as a vision_msgs/msg/Detection2DArray from the
message classes it is given: rclpy's (the node) or a rosbags typestore's (the replay's bag).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import functools
import math
import re
from typing import Any

import cv2
import numpy as np

from anomaly_seg_node.errors import ArtifactError, ConfigError, DataError

DEFAULT_MAX_OBJECTS = 32
OBJECTS_TOPIC = 'anomaly_objects'  # the Detection2DArray topic of the node and the replay's bag
OBJECT_CLASS_ID = 'anomaly'  # hypothesis.class_id of every anomaly object
# The messages of a Detection2DArray (vision_msgs 4; the hypothesis pose is geometry_msgs').
DETECTION_TYPES = (
    'vision_msgs/msg/Detection2DArray', 'vision_msgs/msg/Detection2D',
    'vision_msgs/msg/ObjectHypothesisWithPose', 'vision_msgs/msg/ObjectHypothesis',
    'vision_msgs/msg/BoundingBox2D', 'vision_msgs/msg/Pose2D', 'vision_msgs/msg/Point2D',
    'geometry_msgs/msg/PoseWithCovariance', 'geometry_msgs/msg/Pose', 'geometry_msgs/msg/Point',
    'geometry_msgs/msg/Quaternion')
DEFAULT_BOX_COLOR = (255, 0, 255)  # magenta: apart from the overlay's cyan anomaly pixels
_FPR_NAME = re.compile(r'fpr(\d+(?:\.\d+)?)')  # sidecar names: fpr1 = 1 %, fpr0.1 = 0.1 %


@dataclasses.dataclass(frozen=True)
class AnomalyObject:
    """One anomaly object in pixels of the score map it was found on.

    The box covers columns x .. x + width - 1 and rows y .. y + height - 1 (half-open
    [x, x + width), as OpenCV's rectangles); `area` counts the object's own pixels, not the box.
    Objects sort largest first; the list index + 1 is the id of `find_objects_with_ids`.
    """

    x: int
    y: int
    width: int
    height: int
    area: int
    mean_score: float
    max_score: float
    confidence: float  # in [0, 1], see `object_confidence`
    centroid_x: float  # mean column of the object's pixels
    centroid_y: float  # mean row

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) in pixels."""
        return (self.x, self.y, self.width, self.height)

    def to_dict(self) -> dict[str, Any]:
        """Plain ints and floats, for JSON (replay's frames file, a planner message)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ObjectParams:
    """How `find_objects` turns a score map into objects (see the module docstring)."""

    threshold: float  # score > threshold is anomalous (the node's resolved threshold)
    drivable_ids: tuple[int, ...] = ()  # label ids of the drivable area; () = no restriction
    drivable_margin: int = 0  # pixels the drivable area is grown by (square dilation)
    merge_distance: int = 0  # fragments with a gap <= this many pixels merge; 0 = 8-connected
    min_area_px: int = 1
    min_area_fraction: float = 0.0  # of the map's H * W pixels
    max_objects: int = DEFAULT_MAX_OBJECTS
    confidence_scale: float = 1.0  # score units of the logistic without an FPR table

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(
                self.threshold, (int, float, np.integer, np.floating)) \
                or not math.isfinite(self.threshold):
            raise ConfigError(f'object threshold must be a finite number (score units of the '
                              f'artifact), got {self.threshold!r}; resolve a threshold name '
                              'with artifact.resolve_threshold first')
        ids = self.drivable_ids
        if isinstance(ids, (int, np.integer)) or not isinstance(ids, Iterable):
            raise ConfigError(f'drivable_ids must be a sequence of label ids, e.g. (0,) for the '
                              f'road class, got {ids!r}')
        ids = tuple(ids)
        if any(not _is_int(i) or not 0 <= i <= 255 for i in ids):
            raise ConfigError(f'drivable_ids must be label ids in 0..255 (8-bit semantic '
                              f'labels), got {list(ids)}; map class names to ids with the '
                              "sidecar's classes")
        object.__setattr__(self, 'drivable_ids', tuple(sorted({int(i) for i in ids})))
        for name, low, high in (('drivable_margin', 0, 4096), ('merge_distance', 0, 4096),
                                ('min_area_px', 1, None), ('max_objects', 1, 100_000)):
            value = getattr(self, name)
            if not _is_int(value) or value < low or (high is not None and value > high):
                bound = f'in [{low}, {high}]' if high is not None else f'>= {low}'
                raise ConfigError(f'{name} must be an int {bound} (pixels or a count), got '
                                  f'{value!r}')
        fraction = self.min_area_fraction
        if not _is_real(fraction) or not 0.0 <= fraction < 1.0:
            raise ConfigError(f'min_area_fraction must be in [0, 1) (a share of the frame, e.g. '
                              f'0.0005), got {fraction!r}')
        scale = self.confidence_scale
        if not _is_real(scale) or not math.isfinite(scale) or scale <= 0.0:
            raise ConfigError(f'confidence_scale must be a positive finite number (score units '
                              f'of the logistic confidence), got {scale!r}')

    @functools.cached_property
    def drivable_lut(self) -> np.ndarray:
        """uint8 [256]: 1 for the drivable label ids, 0 otherwise."""
        lut = np.zeros(256, dtype=np.uint8)
        lut[list(self.drivable_ids)] = 1
        return lut

    def min_area(self, height: int, width: int) -> int:
        """The smallest object area kept on an H x W map, in pixels."""
        by_fraction = math.ceil(round(self.min_area_fraction * height * width, 9))
        return max(self.min_area_px, by_fraction)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _fpr_points(table: Mapping[float, float], error: type[Exception] = ConfigError,
                what: str = 'fpr_table') -> tuple[np.ndarray, np.ndarray]:
    """Sorted scores and log10 FPRs of a {score: fpr} table, checked (float64 [P] each)."""
    if not isinstance(table, Mapping):
        raise error(f'{what} must map score values to false-alarm rates, e.g. {{2.1: 0.01, '
                    f'3.4: 0.001}}, got {type(table).__name__}')
    points = []
    for score, fpr in table.items():
        if not _is_real(score) or not math.isfinite(score) or not _is_real(fpr) \
                or not 0.0 < fpr < 1.0:
            raise error(f'{what} point {score!r}: {fpr!r} is not a finite score with a '
                        'false-alarm rate in (0, 1), e.g. 0.01 for 1 %')
        points.append((float(score), float(fpr)))
    if len(points) < 2:
        raise error(f'{what} needs at least two points to interpolate, got {len(points)}; '
                    "pass e.g. the sidecar's fpr1 and fpr0.1 thresholds, or None for the "
                    'logistic confidence')
    points.sort()
    scores = np.array([s for s, _ in points])
    fprs = np.array([f for _, f in points])
    if np.any(np.diff(fprs) > 0.0):
        raise error(f'{what} must give lower (or equal) false-alarm rates to higher scores, got '
                    f'{dict(points)}; a higher threshold cannot flag more inlier pixels')
    return scores, np.log10(fprs)


def fpr_table_from_thresholds(thresholds: Mapping[str, float]) -> dict[float, float] | None:
    """{score: false-alarm rate} from a sidecar's named thresholds, or None when too few.

    Names ``fpr<percent>`` count (``fpr1`` -> 0.01, ``fpr0.1`` -> 0.001, as
    training/calibration.py writes them); others (``tpr95``) are skipped. Names that share a
    score keep the lowest rate (score > tau flags at most that share). None when fewer than two
    distinct scores remain: `find_objects` then falls back to the logistic confidence. Raises
    ArtifactError when the rates do not fall as the scores rise.
    """
    table: dict[float, float] = {}
    for name, score in thresholds.items():
        match = _FPR_NAME.fullmatch(name)
        if match is None:
            continue
        fpr = float(match.group(1)) / 100.0
        if not 0.0 < fpr < 1.0:
            continue
        score = float(score)
        table[score] = min(fpr, table.get(score, 1.0))
    if len(table) < 2:
        return None
    _fpr_points(table, ArtifactError, 'the sidecar thresholds')
    return table


def object_confidence(max_score: float, params: ObjectParams,
                      fpr_table: Mapping[float, float] | None = None) -> float:
    """Confidence in [0, 1] of an object whose highest score is `max_score` (module docstring).

    Non-decreasing in `max_score`: ``1 - FPR(max_score)`` with a table, else the logistic of
    ``(max_score - threshold) / confidence_scale``.
    """
    if fpr_table is None:
        return _logistic(np.array([max_score], dtype=np.float64), params)[0]
    return _table_confidence(np.array([max_score], dtype=np.float64), *_fpr_points(fpr_table))[0]


def _logistic(max_scores: np.ndarray, params: ObjectParams) -> list[float]:
    z = (max_scores - params.threshold) / params.confidence_scale
    with np.errstate(over='ignore'):  # z -> -inf gives exp -> inf and confidence 0
        return (1.0 / (1.0 + np.exp(-z))).tolist()


def _table_confidence(max_scores: np.ndarray, scores: np.ndarray,
                      log_fprs: np.ndarray) -> list[float]:
    # np.interp clamps to the end points outside [scores[0], scores[-1]]
    return (1.0 - 10.0 ** np.interp(max_scores, scores, log_fprs)).tolist()


def find_objects(score: np.ndarray, labels: np.ndarray | None, params: ObjectParams,
                 fpr_table: Mapping[float, float] | None = None) -> list[AnomalyObject]:
    """The anomaly objects of one frame, largest first (see the module docstring).

    score: float [H, W], NaN = unseen. labels: integer [H, W] semantic labels of the same map
    (uint8 is fastest), needed only when ``params.drivable_ids`` is set. fpr_table: optional
    {score value: false-alarm rate} points for the confidence (`fpr_table_from_thresholds`).
    Boxes are in pixels of the given map: scale them when it is not the camera frame.
    """
    return _find(score, labels, params, fpr_table, want_ids=False)[0]


def find_objects_with_ids(score: np.ndarray, labels: np.ndarray | None, params: ObjectParams,
                          fpr_table: Mapping[float, float] | None = None,
                          ) -> tuple[list[AnomalyObject], np.ndarray]:
    """`find_objects` and its object id map: int32 [H, W], 0 = no object, i + 1 = objects[i].

    The id map holds exactly the objects' pixels (after restriction, size filter and count
    limit): ``ids > 0`` is the mask a planner would act on, and ``ComponentMetrics.
    update_instances(ids, gt)`` scores the objects as units (merged fragments count as one).
    """
    return _find(score, labels, params, fpr_table, want_ids=True)


def _check_inputs(score: Any, labels: Any, params: ObjectParams) -> tuple[np.ndarray, Any]:
    if not isinstance(params, ObjectParams):
        raise ConfigError(f'params must be an ObjectParams, got {type(params).__name__}')
    score = np.asarray(score)
    if score.ndim != 2 or score.dtype.kind != 'f' or score.size == 0:
        raise DataError(f'the anomaly score map must be a non-empty float [H, W] array, got '
                        f'{score.dtype} {list(score.shape)}; pass FrameResult.anomaly_score')
    if params.drivable_ids:
        if labels is None:
            raise ConfigError(f'drivable_ids {list(params.drivable_ids)} restrict objects to '
                              'the drivable area, which needs the semantic labels; pass them, '
                              'or set drivable_ids=() for no restriction')
        labels = np.asarray(labels)
        if labels.shape != score.shape or labels.dtype.kind not in 'iu':
            raise DataError(f"semantic labels must be an integer array of the score map's "
                            f'shape {list(score.shape)}, got {labels.dtype} '
                            f'{list(labels.shape)}; resize them with nearest neighbour')
    return score, labels


def _find(score: Any, labels: Any, params: ObjectParams, fpr_table: Any,
          want_ids: bool) -> tuple[list[AnomalyObject], np.ndarray]:
    score, labels = _check_inputs(score, labels, params)
    curve = None if fpr_table is None else _fpr_points(fpr_table)
    height, width = score.shape
    ids = np.zeros((height, width), dtype=np.int32) if want_ids else np.zeros((0, 0), np.int32)
    mask = np.greater(score, params.threshold).view(np.uint8)  # NaN (unseen) compares False
    x0, y0, crop_w, crop_h = cv2.boundingRect(mask)
    if crop_w == 0:
        return [], ids
    # from here on, everything lives in the bounding box of the mask pixels
    sub = mask[y0:y0 + crop_h, x0:x0 + crop_w]
    if params.drivable_ids:
        np.bitwise_and(sub, _drivable(labels, params, (x0, y0, crop_w, crop_h)), out=sub)
    k = params.merge_distance
    grown = sub if k == 0 else cv2.dilate(sub, np.ones((k + 1, k + 1), dtype=np.uint8))
    # plain labelling plus numpy statistics over the mask pixels: OpenCV's statistics pass
    # scans every pixel and is several times slower than the labelling (720x1280, OpenCV 5.1)
    n_groups, groups = cv2.connectedComponents(grown, connectivity=8, ltype=cv2.CV_32S)
    points = cv2.findNonZero(sub)  # int32 (x, y) points, [N, 1, 2] or [N, 2]; None if none
    if points is None:
        return [], ids
    points = points.reshape(-1, 2)
    xs, ys = points[:, 0], points[:, 1]
    group = groups[ys, xs].astype(np.intp)  # group of each mask pixel (not of dilated ones)
    values = score[y0 + ys, x0 + xs].astype(np.float64)
    areas = np.bincount(group, minlength=n_groups)
    keep = np.flatnonzero(areas >= params.min_area(height, width))
    keep = keep[keep > 0]
    if keep.size == 0:
        return [], ids
    left = _reduce_at(np.minimum, xs, group, n_groups, width)
    top = _reduce_at(np.minimum, ys, group, n_groups, height)
    order = keep[np.lexsort((left[keep], top[keep], -areas[keep]))][:params.max_objects]
    right = _reduce_at(np.maximum, xs, group, n_groups, -1)[order] + 1
    bottom = _reduce_at(np.maximum, ys, group, n_groups, -1)[order] + 1
    peaks = _reduce_at(np.maximum, values, group, n_groups, -np.inf)[order]
    sums = np.bincount(group, weights=values, minlength=n_groups)[order]
    sum_x = np.bincount(group, weights=xs, minlength=n_groups)[order]
    sum_y = np.bincount(group, weights=ys, minlength=n_groups)[order]
    area = areas[order]
    confidences = _logistic(peaks, params) if curve is None \
        else _table_confidence(peaks, *curve)
    objects = [
        AnomalyObject(x=x0 + int(left[g]), y=y0 + int(top[g]), width=int(r - left[g]),
                      height=int(b - top[g]), area=int(a), mean_score=float(s / a),
                      max_score=float(p), confidence=float(c),
                      centroid_x=float(x0 + cx / a), centroid_y=float(y0 + cy / a))
        for g, r, b, a, s, p, c, cx, cy in zip(
            order.tolist(), right.tolist(), bottom.tolist(), area.tolist(), sums.tolist(),
            peaks.tolist(), confidences, sum_x.tolist(), sum_y.tolist(), strict=True)]
    if want_ids:
        rank = np.zeros(n_groups, dtype=np.int32)
        rank[order] = np.arange(1, order.size + 1, dtype=np.int32)
        ids[y0 + ys, x0 + xs] = rank[group]
    return objects, ids


def _reduce_at(ufunc: np.ufunc, values: np.ndarray, group: np.ndarray, n_groups: int,
               initial: float) -> np.ndarray:
    """ufunc (np.minimum or np.maximum) of `values` [N] per group id in `group` (intp [N])."""
    # `out` of the values' dtype and intp indices keep ufunc.at on NumPy's fast path (>= 1.25);
    # a cast makes it ~30x slower
    out = np.full(n_groups, initial, dtype=values.dtype)
    ufunc.at(out, group, values)
    return out


def _drivable(labels: np.ndarray, params: ObjectParams,
              crop: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 [h, w] 0/1: the drivable area grown by the margin, inside the crop (x, y, w, h)."""
    x0, y0, crop_w, crop_h = crop
    m = params.drivable_margin
    height, width = labels.shape
    # read the labels `m` beyond the crop so that the dilation inside it is exact
    gx0, gy0 = max(x0 - m, 0), max(y0 - m, 0)
    gx1, gy1 = min(x0 + crop_w + m, width), min(y0 + crop_h + m, height)
    region = labels[gy0:gy1, gx0:gx1]
    if region.dtype == np.uint8:
        road = cv2.LUT(region, params.drivable_lut)
    else:
        road = np.isin(region, params.drivable_ids).view(np.uint8)
    if m > 0:
        road = cv2.dilate(road, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * m + 1, 2 * m + 1)))
    return road[y0 - gy0:y0 - gy0 + crop_h, x0 - gx0:x0 - gx0 + crop_w]


def draw_objects(rgb: np.ndarray, objects: Sequence[AnomalyObject],
                 color: Sequence[int] = DEFAULT_BOX_COLOR, thickness: int = 2,
                 source_hw: tuple[int, int] | None = None, show_confidence: bool = True,
                 ) -> np.ndarray:
    """Draw the objects' boxes (and confidences) onto `rgb` in place and return it.

    rgb: uint8 [H, W, 3], C-contiguous and writable (the pipeline's overlay, a video frame).
    source_hw: the (height, width) of the map the objects were found on, when it differs from
    the image's; boxes are scaled outward to cover the same region.
    """
    image = rgb
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        raise DataError(f'draw_objects needs a uint8 [H, W, 3] image, got '
                        f'{getattr(image, "dtype", type(image).__name__)} '
                        f'{list(getattr(image, "shape", ()))}')
    if not image.flags['C_CONTIGUOUS'] or not image.flags['WRITEABLE']:
        raise DataError('draw_objects draws in place and needs a C-contiguous, writable image; '
                        'pass np.ascontiguousarray(image) (a copy)')
    if not _is_int(thickness) or thickness < 1:
        raise ConfigError(f'box thickness must be an int >= 1 (pixels), got {thickness!r}')
    rgb_color = tuple(int(c) for c in color)  # the image is RGB, so is the colour
    if len(rgb_color) != 3 or any(not 0 <= c <= 255 for c in rgb_color):
        raise ConfigError(f'box colour must be three values in 0..255 (RGB), got {color!r}')
    height, width = image.shape[:2]
    sy, sx = (1.0, 1.0) if source_hw is None else (height / source_hw[0], width / source_hw[1])
    font_scale = max(0.4, height / 1440.0)
    for obj in objects:
        left, top = math.floor(obj.x * sx), math.floor(obj.y * sy)
        right = min(math.ceil((obj.x + obj.width) * sx), width) - 1
        bottom = min(math.ceil((obj.y + obj.height) * sy), height) - 1
        cv2.rectangle(image, (left, top), (right, bottom), rgb_color, thickness)
        if show_confidence:
            text_y = top - 4 if top >= 16 else min(bottom + 14, height - 2)
            cv2.putText(image, f'{obj.confidence:.2f}', (left, text_y),
                        cv2.FONT_HERSHEY_SIMPLEX, font_scale, rgb_color, 1, cv2.LINE_AA)
    return image


def message_classes(*modules: Any) -> dict[str, Any]:
    """{type name: class} of every `DETECTION_TYPES` entry from generated message modules
    (rclpy's ``vision_msgs.msg`` and ``geometry_msgs.msg``), for `detection_array`."""
    packages = {module.__name__.split('.')[0]: module for module in modules}
    return {name: getattr(packages[name.split('/')[0]], name.rsplit('/', 1)[1])
            for name in DETECTION_TYPES}


def detection_array(types: Mapping[str, Any], header: Any,
                    boxes: Sequence[tuple[float, float, float, float]],
                    confidences: Sequence[float],
                    scale_xy: tuple[float, float] = (1.0, 1.0)) -> Any:
    """A vision_msgs/msg/Detection2DArray of anomaly objects, built from ``types`` = {type name:
    message class} of `DETECTION_TYPES`: a rosbags typestore's ``types`` or `message_classes`
    of rclpy's modules. Every field is given, as rosbags' classes need.

    ``header`` (the input image's; None: the classes' default) goes on the array and on every
    detection. One Detection2D per box (x, y, width, height), ``id`` its index: a single
    hypothesis, class_id 'anomaly', score = the confidence, with an identity pose and zero
    covariance; an axis-aligned bbox (theta 0) covering [x, x + width) x [y, y + height) times
    ``scale_xy`` (input pixels per pixel of the boxes), so pixel (0, 0) covers [0, 1) x [0, 1)
    and the centre is (x + width / 2) * sx. Every number is a float (rosidl's float64 setters
    refuse ints).
    """
    sx, sy = (float(v) for v in scale_xy)
    pose = types['geometry_msgs/msg/PoseWithCovariance'](
        pose=types['geometry_msgs/msg/Pose'](
            position=types['geometry_msgs/msg/Point'](x=0.0, y=0.0, z=0.0),
            orientation=types['geometry_msgs/msg/Quaternion'](x=0.0, y=0.0, z=0.0, w=1.0)),
        covariance=np.zeros(36, dtype=np.float64))
    stamp = {} if header is None else {'header': header}
    detections = []
    for index, ((x, y, width, height), confidence) in enumerate(
            zip(boxes, confidences, strict=True)):
        hypothesis = types['vision_msgs/msg/ObjectHypothesisWithPose'](
            hypothesis=types['vision_msgs/msg/ObjectHypothesis'](
                class_id=OBJECT_CLASS_ID, score=float(confidence)),
            pose=pose)
        centre = types['vision_msgs/msg/Pose2D'](
            position=types['vision_msgs/msg/Point2D'](x=float((x + width / 2) * sx),
                                                      y=float((y + height / 2) * sy)),
            theta=0.0)
        bbox = types['vision_msgs/msg/BoundingBox2D'](
            center=centre, size_x=float(width * sx), size_y=float(height * sy))
        detections.append(types['vision_msgs/msg/Detection2D'](
            **stamp, results=[hypothesis], bbox=bbox, id=str(index)))
    return types['vision_msgs/msg/Detection2DArray'](**stamp, detections=detections)
