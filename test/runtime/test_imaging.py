"""The one resize rule (anomaly_seg_node.imaging): known boxes, padding, round trips, odd sizes.

A 480x640 (4:3) camera into a 360x640 (16:9) artifact is the running example.
"""

import cv2
import numpy as np
import pytest

from anomaly_seg_node import imaging
from anomaly_seg_node.errors import ConfigError
from anomaly_seg_node.imaging import (
    ASPECT_TOLERANCE,
    aspect_warning,
    fit_image,
    fit_labels,
    network_mask,
    plan_fit,
    resize_image,
    unfit,
)

CAMERA, NET = (480, 640), (360, 640)
PAD = (10, 20, 30)


def square_frame(top: int = 192, left: int = 272, side: int = 100) -> np.ndarray:
    """A black 480x640 RGB frame with a filled white side x side square (corners on multiples
    of 4, so that x0.75 lands on whole pixels)."""
    frame = np.zeros((*CAMERA, 3), np.uint8)
    frame[top:top + side, left:left + side] = 255
    return frame


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the True pixels."""
    rows, cols = np.nonzero(mask)
    return (int(rows.min()), int(cols.min()), int(rows.max() - rows.min() + 1),
            int(cols.max() - cols.min() + 1))


def receptive_field_segmenter(net_frame: np.ndarray, grow: int = 10) -> np.ndarray:
    """Identity-like: label 1 on bright pixels grown by `grow` network pixels on every side (as
    a network's receptive field does), 0 elsewhere; uint8 [H, W]."""
    bright = (net_frame[..., 0] > 127).astype(np.uint8)
    kernel = np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)
    return cv2.dilate(bright, kernel)


def near_match(original: np.ndarray, restored: np.ndarray) -> np.ndarray:
    """True where `restored` equals `original` at the pixel or one of its 8 neighbours."""
    height, width = original.shape
    padded = np.pad(original, 1, mode='edge')
    ok = np.zeros(original.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            ok |= padded[dy:dy + height, dx:dx + width] == restored
    return ok


def blocks(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A label map of 12 x 16 random constant blocks (ids 0..5)."""
    ids = np.random.default_rng(seed).integers(0, 6, (12, 16), dtype=np.uint8)
    return cv2.resize(ids, (width, height), interpolation=cv2.INTER_NEAREST)


# Plans ------------------------------------------------------------------------------------

def test_letterbox_of_4_3_into_16_9_known_boxes():
    fit = plan_fit(CAMERA, NET, 'letterbox')
    assert fit.mode == fit.requested == 'letterbox'
    assert fit.src_box == (0, 0, 480, 640)
    assert fit.net_box == (0, 80, 360, 480)  # scale 0.75, bars of 80 columns left and right
    assert fit.scale == (0.75, 0.75)
    assert fit.aspect_difference == pytest.approx(0.25)
    assert not fit.identity


def test_crop_center_of_4_3_into_16_9_known_boxes():
    fit = plan_fit(CAMERA, NET, 'crop_center')
    assert fit.mode == 'crop_center'
    assert fit.src_box == (60, 0, 360, 640)  # 60 rows cut at the top and at the bottom
    assert fit.net_box == (0, 0, 360, 640)
    assert fit.scale == (1.0, 1.0)


def test_stretch_and_within_tolerance_stretch():
    stretch = plan_fit(CAMERA, NET, 'stretch')
    assert (stretch.src_box, stretch.net_box) == ((0, 0, 480, 640), (0, 0, 360, 640))
    # 720x1280 -> 368x640: aspect 1.778 vs 1.739, 2.2 % apart: every mode stretches.
    for mode in imaging.RESIZE_MODES:
        fit = plan_fit((720, 1280), (368, 640), mode)
        assert fit.mode == 'stretch' and fit.requested == mode
        assert (fit.src_box, fit.net_box) == ((0, 0, 720, 1280), (0, 0, 368, 640))
    # Just over the tolerance (640 wide: 6.7 % narrower than 16:9) letterboxes.
    assert plan_fit((360, 600), NET, 'letterbox').net_box == (0, 20, 360, 600)
    assert 0.05 < plan_fit((360, 600), NET).aspect_difference < 0.07
    assert plan_fit(NET, NET, 'letterbox').identity
    assert ASPECT_TOLERANCE == 0.05


@pytest.mark.parametrize('src, mode, src_box, net_box', [
    ((1, 1), 'letterbox', (0, 0, 1, 1), (0, 140, 360, 360)),
    ((1, 1), 'crop_center', (0, 0, 1, 1), (0, 0, 360, 640)),
    ((2, 1), 'letterbox', (0, 0, 2, 1), (0, 230, 360, 180)),
    ((100, 1000), 'letterbox', (0, 0, 100, 1000), (148, 0, 64, 640)),
    ((100, 1000), 'crop_center', (0, 411, 100, 178), (0, 0, 360, 640)),
])
def test_odd_sizes(src, mode, src_box, net_box):
    fit = plan_fit(src, NET, mode)
    assert (fit.src_box, fit.net_box) == (src_box, net_box)
    image = np.random.default_rng(1).integers(0, 256, (*src, 3), dtype=np.uint8)
    net = fit_image(image, fit, PAD)
    assert net.shape == (*NET, 3) and net.dtype == np.uint8
    assert (net[~network_mask(fit)] == PAD).all()
    scores = np.ones(NET, np.float32)
    back = unfit(scores, fit, 'linear', np.nan)
    assert back.shape == src and back.dtype == np.float32
    seen = np.zeros(src, bool)
    top, left, height, width = src_box
    seen[top:top + height, left:left + width] = True
    assert (back[seen] == 1.0).all() and np.isnan(back[~seen]).all()


def test_bad_modes_and_sizes_are_config_errors():
    with pytest.raises(ConfigError, match='resize_mode must be one of letterbox, crop_center'):
        plan_fit(CAMERA, NET, 'fit')
    with pytest.raises(ConfigError, match='resize_mode'):
        imaging.check_resize_mode(None)
    with pytest.raises(ConfigError, match='sizes must be positive'):
        plan_fit((0, 640), NET)
    fit = plan_fit(CAMERA, NET)
    with pytest.raises(ConfigError, match='planned for 480x640; plan a fit for each frame'):
        fit_image(np.zeros((240, 320, 3), np.uint8), fit)
    with pytest.raises(ConfigError, match='interpolation must be one of'):
        unfit(np.zeros(NET, np.float32), fit, 'cubic', 0.0)


# Images, labels and the way back -------------------------------------------------------------

def test_fit_image_letterbox_pads_with_the_given_colour():
    frame = np.full((*CAMERA, 3), 200, np.uint8)
    net = fit_image(frame, plan_fit(CAMERA, NET), PAD)
    assert net.shape == (*NET, 3)
    assert (net[:, :80] == PAD).all() and (net[:, 560:] == PAD).all()
    assert (net[:, 80:560] == 200).all()
    # crop_center takes the middle rows: a frame whose rows are their index.
    ramp = np.repeat(np.repeat(np.arange(480, dtype=np.uint16)[:, None] // 2, 640, 1)[..., None],
                     3, 2).astype(np.uint8)
    cut = fit_image(ramp, plan_fit(CAMERA, NET, 'crop_center'))
    np.testing.assert_array_equal(cut, ramp[60:420])


@pytest.mark.parametrize(('src', 'net'), [(CAMERA, NET), ((200, 100), (60, 60)),
                                          ((3, 2), (20, 90)), ((30, 200), (100, 100))])
def test_fit_image_reflect_mirrors_the_picture_into_the_bars(src, net):
    # Known answer: numpy's 'reflect' pad (the edge row or column is not repeated), also where
    # a bar is wider than the picture (mirrored back and forth).
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    fit = plan_fit(src, net)
    top, left, bh, bw = fit.net_box
    content = fit_image(frame, fit, PAD)[top:top + bh, left:left + bw]
    expected = np.pad(content, ((top, net[0] - top - bh), (left, net[1] - left - bw), (0, 0)),
                      mode='reflect')
    np.testing.assert_array_equal(fit_image(frame, fit, PAD, 'reflect'), expected)
    # Without bars the mode changes nothing.
    same = plan_fit(net, net)
    assert fit_image(frame[:1, :1].repeat(net[0], 0).repeat(net[1], 1), same, PAD,
                     'reflect').shape == (*net, 3)
    with pytest.raises(ConfigError, match="pad_mode must be one of reflect, constant, got 'wrap'"):
        fit_image(frame, fit, PAD, 'wrap')


def test_fit_labels_fills_the_bars():
    labels = np.full(CAMERA, 3, np.uint8)
    fitted = fit_labels(labels, plan_fit(CAMERA, NET), fill=255)
    assert fitted.shape == NET and fitted.dtype == np.uint8
    assert (fitted[:, :80] == 255).all() and (fitted[:, 560:] == 255).all()
    assert (fitted[:, 80:560] == 3).all()
    # Nearest neighbour: never a label that was not there.
    mixed = fit_labels(blocks(*CAMERA), plan_fit(CAMERA, NET), fill=255)
    assert set(np.unique(mixed)) <= set(range(6)) | {255}


def test_a_square_stays_square_only_without_stretching():
    frame = square_frame()
    for mode, square in (('letterbox', True), ('crop_center', True), ('stretch', False)):
        fit = plan_fit(CAMERA, NET, mode)
        net = fit_image(frame, fit, PAD)
        _, _, seen_h, seen_w = bbox(net[..., 0] > 127)  # what the model sees
        labels = receptive_field_segmenter(net)
        out = unfit(labels, fit, 'nearest', 255)
        assert out.shape == CAMERA
        _, _, out_h, out_w = bbox(out == 1)
        if square:
            assert seen_h == seen_w and abs(out_h - out_w) <= 1, mode
        else:  # the old rule: 75 x 100 in the network, a 127 x 120 blob back in the frame
            assert (seen_h, seen_w) == (75, 100) and out_h - out_w >= 6
    # letterbox: 100 px -> 75 px, grown by 10 each side -> 95 px -> 126.7 px in the frame.
    top, left, out_h, out_w = bbox(unfit(receptive_field_segmenter(
        fit_image(frame, plan_fit(CAMERA, NET), PAD)), plan_fit(CAMERA, NET), 'nearest',
        255) == 1)
    assert abs(out_h - 127) <= 1 and abs(out_w - 127) <= 1
    assert abs(top + out_h / 2 - 242) <= 1 and abs(left + out_w / 2 - 322) <= 1  # in place


@pytest.mark.parametrize('mode', imaging.RESIZE_MODES)
def test_label_round_trip_within_one_pixel(mode):
    labels = blocks(*CAMERA, seed=3)
    fit = plan_fit(CAMERA, NET, mode)
    back = unfit(fit_labels(labels, fit, fill=255), fit, 'nearest', 255)
    assert back.shape == CAMERA
    top, left, height, width = fit.src_box
    inside = (slice(top, top + height), slice(left, left + width))
    assert near_match(labels, back)[inside].all()  # differences only at block edges
    assert (back[inside] != labels[inside]).mean() < 0.02
    cut = np.ones(CAMERA, bool)
    cut[inside] = False
    assert (back[cut] == 255).all()  # crop_center: rows never seen are the fill
    assert cut.sum() == (120 * 640 if mode == 'crop_center' else 0)


def test_unfit_drops_the_bars_and_interpolates_scores():
    fit = plan_fit(CAMERA, NET)
    scores = np.full(NET, 7.0, np.float32)
    scores[:, 80:560] = np.linspace(0.0, 1.0, 480, dtype=np.float32)
    back = unfit(scores, fit, 'linear', np.nan)
    assert back.shape == CAMERA and not np.isnan(back).any()
    assert back.max() <= 1.0 and back.min() >= 0.0  # the bars' 7.0 never bleeds in
    assert back[0, 0] == 0.0 and back[0, -1] == 1.0


def test_resize_image_shrinks_by_area_and_keeps_matching_sizes():
    image = np.random.default_rng(2).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    assert resize_image(image, (8, 12)) is image
    expected = image.reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    assert np.abs(resize_image(image, (4, 6)).astype(float) - expected).max() <= 0.5 + 1e-9


def test_aspect_warning_names_sizes_ratios_mode_and_fix():
    assert aspect_warning(plan_fit((720, 1280), (368, 640), 'letterbox')) is None
    message = aspect_warning(plan_fit(CAMERA, NET, 'letterbox'))
    for words in ('480x640', '1.333', '360x640', '1.778', '25.0%', 'letterboxed',
                  'resize_mode', '--resize-mode', 'crop_center, stretch'):
        assert words in message, words
    assert 'cut to their centre 360x640' in aspect_warning(plan_fit(CAMERA, NET, 'crop_center'))
