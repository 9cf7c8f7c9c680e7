"""The synthetic anomalies are not separable by colour and local texture alone (issue 2 §2).

Oracle: per-pixel classifiers (scikit-learn, test-only) on colour plus 5x5 local mean and std,
fitted on the test split's own pixels. Their anomaly AP must stay at or below 0.25 while the
anomaly pixel share is a few percent; a positive control shows the oracle does find anomalies
that colour gives away.
"""

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly_seg_node.labels import RAW_ANOMALY_ID, RAW_PALETTE
from training.synth import write_dataset

sklearn = pytest.importorskip('sklearn')
from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import average_precision_score  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

SIZE = (96, 160)
N_TEST = 12
MAX_AP = 0.25


def features(image: np.ndarray) -> np.ndarray:
    """(H*W, 9): RGB, 5x5 local mean and 5x5 local std per channel."""
    f = image.astype(np.float32)
    mean = cv2.blur(f, (5, 5), borderType=cv2.BORDER_REFLECT)
    sq = cv2.blur(f * f, (5, 5), borderType=cv2.BORDER_REFLECT)
    std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    return np.concatenate([f, mean, std], axis=2).reshape(-1, 9)


@pytest.fixture(scope='module')
def test_split(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[np.ndarray, np.ndarray]]:
    root = tmp_path_factory.mktemp('difficulty') / 'sh'
    write_dataset(root, 0, 0, N_TEST, size=SIZE, seed=0, progress=False)
    pairs = []
    for path in sorted((root / 'test' / 'images' / 'test').glob('*/*.png')):
        label_path = Path(str(path).replace('/images/', '/annotations/'))
        image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        pairs.append((image, cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)))
    assert len(pairs) == N_TEST
    return pairs


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([features(image) for image, _ in pairs])
    y = np.concatenate([(label == RAW_ANOMALY_ID).reshape(-1) for _, label in pairs])
    return x, y


def _logistic_ap(x: np.ndarray, y: np.ndarray) -> float:
    xs = StandardScaler().fit_transform(x)
    model = LogisticRegression(max_iter=300).fit(xs, y)
    return float(average_precision_score(y, model.decision_function(xs)))


def test_colour_and_local_statistics_do_not_separate_anomalies(
        test_split: list, record_property: Callable[[str, object], None]) -> None:
    x, y = _stack(test_split)
    share = float(y.mean())
    ap = _logistic_ap(x, y)
    record_property('anomaly_pixel_share', share)
    record_property('logistic_ap', ap)
    print(f'anomaly pixel share {share:.4f}, logistic-regression AP {ap:.4f}')
    assert 0.005 <= share <= 0.1
    assert ap <= MAX_AP


def test_boosted_trees_on_held_out_test_images_stay_near_chance(
        test_split: list, record_property: Callable[[str, object], None]) -> None:
    # a non-linear oracle fitted on half of the test images, scored on the other half
    x_fit, y_fit = _stack(test_split[::2])
    x_eval, y_eval = _stack(test_split[1::2])
    keep = np.random.default_rng(0).choice(len(y_fit), 20_000, replace=False)
    model = HistGradientBoostingClassifier(max_iter=30, random_state=0)
    with threadpool_limits(1):  # OpenMP threads only slow this small fit on a shared machine
        model.fit(x_fit[keep], y_fit[keep])
    ap = float(average_precision_score(y_eval, model.predict_proba(x_eval)[:, 1]))
    record_property('boosting_held_out_ap', ap)
    print(f'held-out share {y_eval.mean():.4f}, gradient-boosting AP {ap:.4f}')
    assert ap <= MAX_AP


def test_oracle_finds_anomalies_that_colour_gives_away(test_split: list) -> None:
    # positive control: paint the same anomaly pixels in the palette's cyan plus noise
    rng = np.random.default_rng(0)
    painted = []
    for image, label in test_split:
        image = image.copy()
        mask = label == RAW_ANOMALY_ID
        noise = rng.normal(0, 6, (int(mask.sum()), 3))
        image[mask] = np.clip(np.array(RAW_PALETTE[RAW_ANOMALY_ID]) + noise, 0, 255)
        painted.append((image, label))
    assert _logistic_ap(*_stack(painted)) >= 0.8
