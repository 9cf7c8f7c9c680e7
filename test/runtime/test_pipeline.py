"""FramePipeline with a fake segmenter whose outputs are known functions of the pixel position."""

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

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
