"""FramePipeline with a fake segmenter whose outputs are known functions of the pixel position."""

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from anomaly_seg_node import imaging
from anomaly_seg_node import pipeline as pipeline_module
from anomaly_seg_node.errors import BackendError, ConfigError, ImageDecodeError
from anomaly_seg_node.pipeline import OUTPUTS, FramePipeline, scale_camera_info

CLASSES = ['road', 'car', 'building', 'person', 'sky', 'pole']
PALETTE = [(128, 64, 128), (0, 0, 142), (70, 70, 70), (220, 20, 60), (70, 130, 180),
           (153, 153, 153)]
ANOMALY = (0, 255, 255)


class FakeSegmenter:
    """labels = column index mod 6 (int32), anomaly score = row index (float32), [1, H, W]."""

    def __init__(self, size=(4, 6), labels=None):
        self.input_size = size
        self.calls = 0
        self.frames = []
        h, w = size
        cols = np.arange(w, dtype=np.int32) % len(CLASSES)
        self.labels = np.broadcast_to(cols, (h, w)).copy() if labels is None else labels
        self.score = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (h, w)).copy()

    def __call__(self, frames):
        self.calls += 1
        self.frames.append(frames.copy())
        assert frames.shape == (*self.input_size, 3) and frames.dtype == np.uint8
        return SimpleNamespace(labels=self.labels[None], anomaly_score=self.score[None])


def make(size=(4, 6), **kwargs):
    seg = FakeSegmenter(size, labels=kwargs.pop('labels', None))
    return FramePipeline(seg, CLASSES, PALETTE, anomaly_color=ANOMALY, **kwargs), seg


def frame(height=8, width=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize('resolution, shape', [('input', (8, 12)), ('network', (4, 6))])
def test_every_output_shape_and_dtype(resolution, shape):
    pipe, _ = make(output_resolution=resolution)
    res = pipe.process(frame())
    assert res.semantic_mask.shape == shape and res.semantic_mask.dtype == np.uint8
    assert res.anomaly_score.shape == shape and res.anomaly_score.dtype == np.float32
    assert res.anomaly_mask.shape == shape and res.anomaly_mask.dtype == np.uint8
    assert set(np.unique(res.anomaly_mask)) <= {0, 255}
    for rgb in (res.semantic_color, res.overlay):
        assert rgb.shape == (*shape, 3) and rgb.dtype == np.uint8
    for stage in ('resize', 'infer', 'labels', 'upsample', 'threshold', 'colour', 'overlay',
                  'total'):
        assert res.timings_ms[stage] >= 0.0


def test_labels_upsampled_nearest_and_scores_bilinear():
    labels = np.array([[0, 5, 0, 5, 3, 1], [5, 0, 255, 2, 0, 4]] * 2, dtype=np.int32)
    pipe, seg = make(labels=labels)
    res = pipe.process(frame())
    # x2 in both directions: every network label becomes a 2x2 block, never a blend.
    np.testing.assert_array_equal(res.semantic_mask,
                                  np.repeat(np.repeat(seg.labels, 2, axis=0), 2, axis=1))
    # Bilinear of a row ramp with pixel-centre alignment: y_src = (y + 0.5) / 2 - 0.5, clamped.
    y_src = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    np.testing.assert_allclose(res.anomaly_score, np.repeat(y_src[:, None], 12, axis=1),
                               atol=1e-5)


def test_non_integer_upsampling_creates_no_new_labels():
    labels = np.array([[0, 3, 5], [255, 1, 2]], dtype=np.int32)
    pipe, _ = make(size=(2, 3), labels=labels)
    res = pipe.process(frame(7, 11), want={'semantic_mask'})
    assert set(np.unique(res.semantic_mask)) == {0, 1, 2, 3, 5, 255}
    assert res.semantic_mask[0, 0] == 0 and res.semantic_mask[-1, -1] == 2


def test_input_resized_to_segmenter_size_and_cropped():
    pipe, seg = make(size=(4, 8), crop=(2, 4, 1, 3))
    image = frame(10, 12)
    res = pipe.process(image)
    # The crop is already the network size: the segmenter sees exactly the cropped pixels.
    np.testing.assert_array_equal(seg.frames[0], image[2:6, 1:9])
    inside = (slice(2, 6), slice(1, 9))
    np.testing.assert_array_equal(res.semantic_mask[inside], seg.labels)
    np.testing.assert_array_equal(res.anomaly_score[inside], seg.score)
    outside = np.ones((10, 12), bool)
    outside[inside] = False
    assert (res.semantic_mask[outside] == 255).all()
    assert np.isnan(res.anomaly_score[outside]).all()
    assert (res.anomaly_mask[outside] == 0).all()
    assert (res.semantic_color[outside] == 0).all()
    np.testing.assert_array_equal(res.overlay[outside], image[outside])


def test_input_shrunk_with_area_interpolation():
    pipe, seg = make(size=(4, 6))
    image = frame(8, 12)
    pipe.process(image, want={'semantic_mask'})
    expected = image.reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    assert np.abs(seg.frames[0].astype(float) - expected).max() <= 0.5 + 1e-9


def test_network_resolution_matches_segmenter_output():
    pipe, seg = make(size=(4, 6), output_resolution='network', crop=(0, 2, 0, 0))
    res = pipe.process(frame(10, 12))
    np.testing.assert_array_equal(res.semantic_mask, seg.labels)
    np.testing.assert_array_equal(res.anomaly_score, seg.score)


def test_threshold_change_takes_effect():
    pipe, _ = make(output_resolution='network', threshold=1.5)
    expected = np.zeros((4, 6), np.uint8)
    expected[2:] = 255  # score = row index > 1.5
    np.testing.assert_array_equal(pipe.process(frame()).anomaly_mask, expected)
    pipe.threshold = 2.5
    expected[2] = 0
    res = pipe.process(frame())
    np.testing.assert_array_equal(res.anomaly_mask, expected)
    assert res.threshold == 2.5


def test_palette_colours_exact_and_void_black():
    labels = np.array([[0, 1, 2], [3, 255, 9]], dtype=np.int32)  # 9 is no class -> void
    pipe, _ = make(size=(2, 3), labels=labels, output_resolution='network')
    res = pipe.process(frame(2, 3), want={'semantic_color', 'semantic_mask'})
    assert res.semantic_mask[1, 2] == 255
    expected = np.array([[PALETTE[0], PALETTE[1], PALETTE[2]], [PALETTE[3], (0, 0, 0),
                         (0, 0, 0)]], dtype=np.uint8)
    np.testing.assert_array_equal(res.semantic_color, expected)


def test_overlay_blends_classes_and_paints_anomalies():
    labels = np.array([[0, 1, 255], [2, 3, 4], [5, 0, 1]], dtype=np.int32)
    pipe, _ = make(size=(3, 3), labels=labels, output_resolution='network', threshold=1.5,
                   overlay_alpha=0.25)
    image = frame(3, 3, seed=4)
    res = pipe.process(image, want={'overlay'})
    colour = np.array(PALETTE, np.uint8)[labels[:2].clip(0, 5)]
    blend = np.round(image[:2] * 0.75 + colour * 0.25).astype(np.uint8)
    assert np.abs(res.overlay[0, :2].astype(int) - blend[0, :2]).max() <= 1
    np.testing.assert_array_equal(res.overlay[0, 2], image[0, 2])  # void: frame untouched
    assert np.abs(res.overlay[1].astype(int) - blend[1]).max() <= 1
    assert (res.overlay[2] == ANOMALY).all()  # score 2 > 1.5: the whole row is painted
    pipe.overlay_alpha = 0.0
    np.testing.assert_array_equal(pipe.process(image, want={'overlay'}).overlay[:2], image[:2])


class CountingCv2:
    """Stands in for the pipeline's cv2 and counts the resizes and blends it is asked for."""

    def __init__(self):
        self.resized = []
        self.blends = 0

    def __getattr__(self, name):
        return getattr(cv2, name)

    def resize(self, image, size, interpolation):
        self.resized.append((image.dtype, interpolation))
        return cv2.resize(image, size, interpolation=interpolation)

    def addWeighted(self, *args):  # noqa: N802 (cv2's name)
        self.blends += 1
        return cv2.addWeighted(*args)


def test_only_requested_outputs_are_computed(monkeypatch):
    counting = CountingCv2()
    monkeypatch.setattr(pipeline_module, 'cv2', counting)
    monkeypatch.setattr(imaging, 'cv2', counting)  # the resizes happen there
    pipe, seg = make()
    res = pipe.process(frame(), want={'semantic_mask'})
    assert res.semantic_mask is not None
    assert res.anomaly_score is None and res.anomaly_mask is None
    assert res.semantic_color is None and res.overlay is None
    # frame shrink + label upsample; the score map is never upsampled, nothing is blended.
    assert counting.resized == [(np.uint8, cv2.INTER_AREA), (np.uint8, cv2.INTER_NEAREST_EXACT)]
    assert counting.blends == 0
    counting.resized.clear()
    res = pipe.process(frame(), want={'anomaly_mask'})
    assert res.anomaly_mask is not None and res.semantic_mask is None
    assert counting.resized == [(np.uint8, cv2.INTER_AREA), (np.float32, cv2.INTER_LINEAR)]
    res = pipe.process(frame(), want=set())
    assert all(getattr(res, name) is None for name in OUTPUTS)
    assert counting.blends == 0 and seg.calls == 3


def test_camera_info_scaling_known_answer():
    k = [500.0, 0.0, 320.0, 0.0, 510.0, 240.0, 0.0, 0.0, 1.0]
    p = [500.0, 0.0, 320.0, -25.0, 0.0, 510.0, 240.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    # crop 10 top, 30 bottom, 20 left, 20 right: 600 x 440 -> 300 x 220 (x0.5 both ways).
    k2, p2 = scale_camera_info(k, p, 640, 480, (10, 30, 20, 20), (220, 300))
    np.testing.assert_allclose(k2, [250.0, 0.0, 150.0, 0.0, 255.0, 115.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(p2, [250.0, 0.0, 150.0, -12.5, 0.0, 255.0, 115.0, 0.0,
                                    0.0, 0.0, 1.0, 0.0])
    k3, _ = scale_camera_info(k, p, 640, 480, None, (240, 1280))  # x2 wide, x0.5 high
    np.testing.assert_allclose(k3[[0, 2, 4, 5]], [1000.0, 640.0, 255.0, 120.0])
    with pytest.raises(ConfigError, match='crop'):
        scale_camera_info(k, p, 640, 480, (400, 100, 0, 0), (10, 10))


def test_bad_settings_and_inputs_are_domain_errors():
    pipe, _ = make()
    with pytest.raises(ConfigError, match='threshold'):
        pipe.threshold = float('nan')
    with pytest.raises(ConfigError, match='overlay_alpha'):
        pipe.overlay_alpha = 1.5
    with pytest.raises(ConfigError, match='unknown outputs'):
        pipe.process(frame(), want={'depth'})
    with pytest.raises(ImageDecodeError, match='RGB uint8'):
        pipe.process(frame()[:, :, 0])
    with pytest.raises(ConfigError, match='crop'):
        make(crop=(1, 2, 3))
    with pytest.raises(ConfigError, match='leaves nothing'):
        make(crop=(4, 4, 0, 0))[0].process(frame())
    with pytest.raises(ConfigError, match='palette'):
        FramePipeline(FakeSegmenter(), CLASSES, PALETTE[:3])
    with pytest.raises(ConfigError, match='output_resolution'):
        make(output_resolution='half')
    broken, seg = make()
    seg.score = np.zeros((3, 3), np.float32)
    with pytest.raises(BackendError, match='anomaly_score'):
        broken.process(frame())


# Frames of another aspect ratio: a 480x640 (4:3) camera, a 360x640 (16:9) artifact ----------

class SquareSegmenter:
    """Identity-like at 360x640: label 1 (car) on bright pixels grown by 10 network pixels on
    every side (a receptive field), else 0 (road); score = label. Keeps the frames it saw."""

    input_size = (360, 640)

    def __init__(self):
        self.frames = []

    def __call__(self, frames):
        self.frames.append(frames.copy())
        bright = (frames[..., 0] > 127).astype(np.uint8)
        labels = cv2.dilate(bright, np.ones((21, 21), np.uint8)).astype(np.int32)
        return SimpleNamespace(labels=labels[None], anomaly_score=labels[None].astype(np.float32))


def square_frame():
    """Black 480x640 with a white 100x100 square at rows 192..291, columns 272..371."""
    image = np.zeros((480, 640, 3), np.uint8)
    image[192:292, 272:372] = 255
    return image


def box(mask):
    rows, cols = np.nonzero(mask)
    return (rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)


def square_pipeline(**kwargs):
    seg = SquareSegmenter()
    warnings = []
    pipe = FramePipeline(seg, CLASSES, PALETTE, threshold=0.5, anomaly_color=ANOMALY,
                         on_warning=warnings.append, **kwargs)
    return pipe, seg, warnings


def test_a_4_3_frame_is_letterboxed_and_its_square_stays_square():
    pipe, seg, warnings = square_pipeline(pad_rgb=(10, 20, 30))
    for _ in range(3):
        res = pipe.process(square_frame())
    for name in OUTPUTS:
        assert getattr(res, name).shape[:2] == (480, 640), name
    # The model saw the square as a square, with bars of the pad colour left and right.
    seen = seg.frames[0]
    assert box(seen[..., 0] > 127) == (144, 284, 75, 75)
    assert (seen[:, :80] == (10, 20, 30)).all() and (seen[:, 560:] == (10, 20, 30)).all()
    # Back in the frame: 75 + 2 x 10 network pixels = 126.7 frame pixels, on both axes.
    top, left, height, width = box(res.semantic_mask == 1)
    assert abs(height - width) <= 1 and abs(height - 127) <= 1
    assert abs(top + height / 2 - 242) <= 1 and abs(left + width / 2 - 322) <= 1
    assert not np.isnan(res.anomaly_score).any()  # letterbox: every frame pixel is seen
    assert (res.semantic_mask != 255).all()
    assert len(warnings) == 1  # once, not per frame
    for words in ('480x640', '1.333', '360x640', '1.778', 'letterboxed', 'resize_mode',
                  '--resize-mode'):
        assert words in warnings[0], words


def test_reflect_bars_mirror_the_picture_and_are_dropped_on_the_way_back():
    # The square touches the frame's left edge: reflect padding mirrors it into the left bar,
    # where the model sees (and labels) a second square; only the real one comes back.
    image = np.zeros((480, 640, 3), np.uint8)
    image[192:292, 0:100] = 255
    pipe, seg, warnings = square_pipeline(pad_mode='reflect', pad_rgb=(10, 20, 30))
    res = pipe.process(image)
    seen = seg.frames[0]
    np.testing.assert_array_equal(seen[:, :80], seen[:, 160:80:-1])  # mirrored, edge not doubled
    assert (seen[144:219, 6:80, 0] > 127).all() and (seen[:, :6] == 0).all()
    # The segmenter grows bright areas by 10 network pixels (13.3 frame pixels) a side; the
    # left growth fell into the bar with the mirror image, and the bar is dropped.
    top, left, height, width = box(res.semantic_mask == 1)
    assert left == 0 and abs(top - 179) <= 1 and abs(height - 127) <= 1
    assert abs(width - 113) <= 1
    assert res.semantic_mask.shape == (480, 640) and len(warnings) == 1
    with pytest.raises(ConfigError, match='pad_mode must be one of'):
        square_pipeline(pad_mode='mirror')


def test_stretch_distorts_the_square():
    # What the old rule did, now only on request: the square comes back 126 high, 120 wide.
    pipe, seg, warnings = square_pipeline(resize_mode='stretch')
    res = pipe.process(square_frame())
    assert box(seg.frames[0][..., 0] > 127)[2:] == (75, 100)
    _, _, height, width = box(res.semantic_mask == 1)
    assert height - width >= 6
    assert len(warnings) == 1 and 'resized to 360x640' in warnings[0]


def test_warning_once_per_size_and_never_for_a_matching_aspect():
    pipe, _, warnings = square_pipeline()
    pipe.process(np.zeros((720, 1280, 3), np.uint8))  # 16:9 exactly
    pipe.process(np.zeros((368, 640, 3), np.uint8))  # 2.2 % apart: stretched, silently
    assert warnings == []
    for _ in range(2):
        pipe.process(square_frame())
        pipe.process(np.zeros((480, 480, 3), np.uint8))
    assert len(warnings) == 2 and '480x480' in warnings[1]
    cropped, _, crop_warnings = square_pipeline(crop=(0, 120, 0, 0))  # 360x640 after the crop
    cropped.process(square_frame())
    assert crop_warnings == []
    with pytest.raises(ConfigError, match='resize_mode must be one of'):
        square_pipeline(resize_mode='fill')


def test_crop_center_leaves_the_cut_rows_void_and_nan():
    pipe, seg, _ = square_pipeline(resize_mode='crop_center')
    image = square_frame()
    res = pipe.process(image)
    np.testing.assert_array_equal(seg.frames[0], image[60:420])  # the middle, unscaled
    for rows in (slice(0, 60), slice(420, 480)):
        assert (res.semantic_mask[rows] == 255).all()
        assert np.isnan(res.anomaly_score[rows]).all()
        assert (res.anomaly_mask[rows] == 0).all()
        np.testing.assert_array_equal(res.overlay[rows], image[rows])
    assert (res.semantic_mask[60:420] != 255).all()
    assert box(res.semantic_mask == 1) == (182, 262, 120, 120)


def test_network_resolution_marks_the_bars_void_and_nan():
    pipe, _, _ = square_pipeline(output_resolution='network', pad_rgb=(10, 20, 30))
    res = pipe.process(square_frame())
    assert res.semantic_mask.shape == (360, 640) and res.overlay.shape == (360, 640, 3)
    for cols in (slice(0, 80), slice(560, 640)):
        assert (res.semantic_mask[:, cols] == 255).all()
        assert np.isnan(res.anomaly_score[:, cols]).all()
        assert (res.anomaly_mask[:, cols] == 0).all()
        assert (res.overlay[:, cols] == (10, 20, 30)).all()  # the fitted frame: pad colour
    assert (res.semantic_mask[:, 80:560] != 255).all()
    assert not np.isnan(res.anomaly_score[:, 80:560]).any()
    assert box(res.semantic_mask == 1) == (134, 274, 95, 95)
    # Mirrored bars are what the model saw, but the overlay shows them flat in the pad colour.
    mirrored, seg, _ = square_pipeline(output_resolution='network', pad_rgb=(10, 20, 30),
                                       pad_mode='reflect')
    image = square_frame()
    image[:, :40] = 90  # a stripe at the left edge, mirrored into the left bar
    res = mirrored.process(image)
    assert (seg.frames[0][:, 51:80] == 90).all()
    for cols in (slice(0, 80), slice(560, 640)):
        assert (res.overlay[:, cols] == (10, 20, 30)).all()
    np.testing.assert_array_equal(res.semantic_mask, pipe.process(image).semantic_mask)


K = [500.0, 0.0, 320.0, 0.0, 510.0, 240.0, 0.0, 0.0, 1.0]
P = [500.0, 0.0, 320.0, -25.0, 0.0, 510.0, 240.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_camera_info_follows_the_letterbox():
    # 640x480 into 640x360: x0.75 both ways, then 80 columns of bar on the left.
    k, p = scale_camera_info(K, P, 640, 480, None, (360, 640), 'letterbox')
    np.testing.assert_allclose(k, [375.0, 0.0, 320.0, 0.0, 382.5, 180.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(p, [375.0, 0.0, 320.0, -18.75, 0.0, 382.5, 180.0, 0.0,
                                   0.0, 0.0, 1.0, 0.0])
    # A 480x480 crop (80 columns cut each side) into 360x640: x0.75, bars of 140 columns.
    k, _ = scale_camera_info(K, P, 640, 480, (0, 0, 80, 80), (360, 640), 'letterbox')
    np.testing.assert_allclose(k[[0, 2, 4, 5]], [375.0, (320 - 80) * 0.75 + 140, 382.5, 180.0])
    # crop_center: no scale, 60 rows cut at the top.
    k, p = scale_camera_info(K, P, 640, 480, None, (360, 640), 'crop_center')
    np.testing.assert_allclose(k, [500.0, 0.0, 320.0, 0.0, 510.0, 180.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(p[[2, 3, 6]], [320.0, -25.0, 180.0])
    # stretch (the default, as before resize_mode): x1 wide, x0.75 high.
    k, _ = scale_camera_info(K, P, 640, 480, None, (360, 640))
    np.testing.assert_allclose(k[[0, 2, 4, 5]], [500.0, 320.0, 382.5, 180.0])


def test_camera_info_maps_the_square_onto_the_network_frame():
    # A ray through the square's corner pixel (272, 192) lands where the model sees that corner.
    pipe, seg, _ = square_pipeline()
    pipe.process(square_frame())
    k, _ = scale_camera_info(K, P, 640, 480, None, (360, 640), pipe.resize_mode)
    x, y = (272 - K[2]) / K[0], (192 - K[5]) / K[4]  # normalised coordinates of the corner
    u, v = k[0] * x + k[2], k[4] * y + k[5]
    top, left, _, _ = box(seg.frames[0][..., 0] > 127)
    assert (u, v) == pytest.approx((left, top))


def test_seen_mask_says_where_the_outputs_hold_answers():
    assert square_pipeline()[0].seen_mask((480, 640)) is None  # letterbox sees everything
    assert square_pipeline(resize_mode='stretch')[0].seen_mask((480, 640)) is None
    cut = square_pipeline(resize_mode='crop_center')[0].seen_mask((480, 640))
    assert cut.shape == (480, 640) and cut[60:420].all() and not cut[:60].any()
    assert not cut[420:].any()
    # A crop of 120 bottom rows leaves 360x640 (16:9): only the crop is unseen.
    cropped = square_pipeline(crop=(0, 120, 0, 0), resize_mode='crop_center')[0]
    mask = cropped.seen_mask((480, 640))
    assert mask[:360].all() and not mask[360:].any()
    bars = square_pipeline(output_resolution='network')[0].seen_mask((480, 640))
    assert bars.shape == (360, 640) and bars[:, 80:560].all() and not bars[:, :80].any()


# Host post-processing: OpenCV where it is bit-identical to the numpy formulation -------------

SHAPES = [(1, 1), (1, 7), (3, 5), (17, 31), (64, 96), (241, 319), (360, 641)]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('share', [0.0, 0.3, 1.0])
def test_copy_where_is_bit_identical_to_numpy(shape, share):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    src = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    dst = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    mask = rng.random(shape) < share
    expected = dst.copy()
    np.copyto(expected, src, where=mask[:, :, None])  # the previous formulation
    for given in (mask, mask.view(np.uint8) * np.uint8(255)):
        out = dst.copy()
        result = pipeline_module.copy_where(src, given, out)
        assert result is out  # in place
        assert result.dtype == np.uint8 and result.shape == (*shape, 3)
        np.testing.assert_array_equal(result, expected)
    # a strided source (a view of a larger frame) and a strided mask work alike
    big = rng.integers(0, 256, (shape[0] + 2, shape[1] + 3, 3), dtype=np.uint8)
    view = big[1:1 + shape[0], 2:2 + shape[1]]
    tall = np.zeros((shape[0] * 2, shape[1]), bool)
    tall[::2] = mask
    expected = dst.copy()
    np.copyto(expected, view, where=mask[:, :, None])
    np.testing.assert_array_equal(pipeline_module.copy_where(view, tall[::2], dst.copy()),
                                  expected)


@pytest.mark.parametrize('shape', SHAPES)
def test_colour_lookup_is_bit_identical_to_np_take(shape):
    rng = np.random.default_rng(shape[0] + 7 * shape[1])
    lut = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    labels = rng.integers(0, 256, shape, dtype=np.uint8)
    expected = np.take(lut, labels, axis=0)  # the previous formulation
    colour = pipeline_module.colour_lookup(pipeline_module.pack_lut(lut), labels)
    assert colour.dtype == np.uint8 and colour.shape == (*shape, 3)
    assert colour.flags.c_contiguous  # encode_image and cv2 take it as it is
    np.testing.assert_array_equal(colour, expected)
    strided = np.ascontiguousarray(np.repeat(labels, 2, axis=1))[:, ::2]
    np.testing.assert_array_equal(
        pipeline_module.colour_lookup(pipeline_module.pack_lut(lut), strided), expected)


def test_overlay_and_colour_match_the_numpy_formulation():
    """The whole overlay, void pixels (the crop) included, equals the previous numpy code."""
    pipe, seg = make(size=(8, 12), crop=(2, 1, 3, 0), overlay_alpha=0.4)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (24, 35, 3), dtype=np.uint8)
    result = pipe.process(rgb, OUTPUTS)
    labels8 = result.semantic_mask
    colour = np.take(pipe.lut, labels8, axis=0)
    np.testing.assert_array_equal(result.semantic_color, colour)
    overlay = cv2.addWeighted(rgb, 0.6, colour, 0.4, 0.0)
    np.copyto(overlay, rgb, where=(labels8 == pipe.void_id)[:, :, None])
    overlay[result.anomaly_score > result.threshold] = ANOMALY
    np.testing.assert_array_equal(result.overlay, overlay)
    assert (labels8 == pipe.void_id).any()  # the crop left void pixels to copy back


@pytest.mark.parametrize('value, words', [
    ((1, 2, 3), '4 non-negative integers'), ([0, -1, 0, 0], '4 non-negative integers'),
    ((0, 0, 0, True), '4 non-negative integers'), ((0, 0, 0, 1.0), '4 non-negative integers'),
    ('0000', '4 integers'), (4, '4 integers'), (None, '4 integers')])
def test_check_crop_is_the_one_crop_check(value, words):
    with pytest.raises(ConfigError, match=f'^crop must be {words}'):
        pipeline_module.check_crop(value)
    assert pipeline_module.check_crop(None, optional=True) == (0, 0, 0, 0)
    assert pipeline_module.check_crop(np.array([1, 2, 3, 4])) == (1, 2, 3, 4)
    with pytest.raises(ConfigError, match='^parameter crop must be'):
        pipeline_module.check_crop(value, 'parameter crop')


@pytest.mark.parametrize('resolution', ['input', 'network'])
def test_prepare_infer_render_on_other_threads_equal_process(resolution):
    pipe, seg = make(output_resolution=resolution, crop=(1, 0, 0, 0), threshold=1.5)
    expected = pipe.process(frame(9, 12))
    prepared = pipe.prepare(frame(9, 12))
    assert seg.calls == 1 and prepared.net_frame.shape == (4, 6, 3)  # no inference yet
    pipe.threshold, pipe.overlay_alpha = 0.5, 0.9  # the frame keeps the values it was taken with
    with ThreadPoolExecutor(1) as pool:  # as the node's stage threads do
        inferred = pool.submit(pipe.infer, prepared).result()
        assert seg.calls == 2
        result = pool.submit(pipe.render, inferred).result()
    assert result.threshold == expected.threshold == 1.5
    for name in OUTPUTS:
        np.testing.assert_array_equal(getattr(result, name), getattr(expected, name))
    laps = ('resize', 'infer', 'labels', 'upsample', 'threshold', 'colour', 'overlay')
    assert result.timings_ms['total'] == pytest.approx(sum(result.timings_ms[k] for k in laps))
