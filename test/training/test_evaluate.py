"""`anomaly-seg evaluate` (training/evaluate.py): known answers with oracle predictors, agreement
with scikit-learn, the other-town threshold of open-mIoU, and a tiny checkpoint end to end.
"""

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
import torch

from anomaly_seg_node.errors import ArtifactError, ConfigError, DataError
from training import checkpoint as ckpt_io
from training import evaluate_command
from training.config import load_config
from training.data.streethazards import StreetHazards
from training.evaluate import checkpoint_predictor, evaluate, parse_scores, run_evaluation
from training.networks.swiftnet import SwiftNet
from training.synth import write_dataset

ROOT = Path(__file__).resolve().parents[2]
K = 12


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval_data')
    write_dataset(root, train=1, val=1, test=6, size=(48, 96), seed=1, progress=False)
    return root


def _key(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture(scope='module')
def truth(data):
    """image hash -> (town, train-id label, ood mask) of every test image."""
    table = {}
    for town in ('t5', 't6'):
        ds = StreetHazards(data, 'test', towns=[town])
        for i in range(len(ds)):
            item = ds[i]
            image = item['image'].numpy().transpose(1, 2, 0)
            table[_key(image)] = (town, item['label'].numpy(), item['ood'].numpy())
    return table


FACTS = {'source': 'oracle', 'method': 'densehybrid', 'num_classes': K,
         'mapping': 'densehybrid12', 'temperature': None}


def _oracle(truth, score_of):
    def predict(image):
        town, label, ood = truth[_key(image)]
        pred = np.where(label == 255, 0, label).astype(np.int64)
        return pred, {'DH': score_of(town, ood).astype(np.float32)}
    return predict


def test_perfect_oracle_scores_full_marks(data, truth, tmp_path):
    predict = _oracle(truth, lambda town, ood: (ood == 1).astype(np.float32))
    m = run_evaluation(predict, FACTS, data, ['DH'], tmp_path, progress=False)
    dh = m['scores']['DH']
    for protocol in ('per_image', 'pooled'):
        assert dh[protocol]['ap'] == pytest.approx(1.0)
        assert dh[protocol]['auroc'] == pytest.approx(1.0)
        assert dh[protocol]['fpr95'] == pytest.approx(0.0)
    assert m['closed_miou'] == pytest.approx(1.0)
    assert dh['open_miou'] == pytest.approx(1.0)
    assert all(t['anomaly_iou'] == pytest.approx(1.0) for t in dh['open_per_town'].values())
    assert m['towns'] == {'t5': 3, 't6': 3} and m['images'] == 6
    # a perfect mask at each town's open-mIoU threshold: every component found, no false one
    components = dh['components']
    assert components['siou'] == components['ppv'] == components['f1_mean'] == 1.0
    assert components['n_gt'] == components['n_pred'] > 0
    assert (components['min_pred_area'], components['min_gt_area']) == (0, 0)
    threshold = components['threshold']
    assert threshold['rule'] == 'open_miou' and threshold['name'] == 'tpr95, other town'
    assert threshold['per_town'] == {t: v['tau'] for t, v in dh['open_per_town'].items()}
    assert 'without size filters' in m['protocols']['components']
    assert 'open-mIoU threshold of each town' in m['protocols']['components']
    anomaly = sum(int((ood == 1).sum()) for _, _, ood in truth.values())
    evaluated = sum(int((ood <= 1).sum()) for _, _, ood in truth.values())
    assert m['anomaly_pixel_share'] == pytest.approx(anomaly / evaluated)


def test_threshold_of_each_town_comes_from_the_other_town(data, truth, tmp_path):
    """Scores: anomaly indicator + 10 in t5, + 0 in t6. tau(t5) is set on t6, so it lies in
    [0, 1] and flags every t5 pixel; tau(t6) is set on t5, so it lies near 10 and flags none."""
    predict = _oracle(truth, lambda town, ood: (ood == 1) + (10.0 if town == 't5' else 0.0))
    m = run_evaluation(predict, FACTS, data, ['DH'], tmp_path, progress=False)
    towns = m['scores']['DH']['open_per_town']
    assert 0.0 <= towns['t5']['tau'] <= 1.0 and 9.9 < towns['t6']['tau'] <= 11.0
    assert towns['t5']['open_miou'] == 0.0  # every inlier pixel flagged: all false negatives
    assert 0.0 < towns['t5']['anomaly_iou'] < 0.5
    assert towns['t6']['anomaly_iou'] == 0.0 and 0.0 < towns['t6']['open_miou'] < 1.0
    expected = (3 * towns['t5']['open_miou'] + 3 * towns['t6']['open_miou']) / 6
    assert m['scores']['DH']['open_miou'] == pytest.approx(expected)


def test_one_town_calibrates_on_itself_and_says_so(data, truth, tmp_path):
    predict = _oracle(truth, lambda town, ood: (ood == 1).astype(np.float32))
    m = run_evaluation(predict, FACTS, data, ['DH'], tmp_path, towns=['t5'], limit=2,
                       progress=False)
    assert m['towns'] == {'t5': 2} and 'same (only) town' in m['protocols']['open_miou']
    assert m['scores']['DH']['open_miou'] == pytest.approx(1.0)


def test_ap_auroc_match_scikit_learn(data, truth, tmp_path):
    rng = np.random.default_rng(0)
    noise = {}

    def score_of(town, ood):
        key = ood.tobytes()
        if key not in noise:
            noise[key] = rng.normal(size=ood.shape) + 1.5 * (ood == 1)
        return noise[key]

    m = run_evaluation(_oracle(truth, score_of), FACTS, data, ['DH'], tmp_path, progress=False)
    aps, aurocs, pooled_s, pooled_y = [], [], [], []
    for _, _, ood in truth.values():
        s = score_of(None, ood).astype(np.float32)
        keep = ood <= 1
        y = (ood[keep] == 1).astype(int)
        pooled_s.append(s[keep])
        pooled_y.append(y)
        if 0 < y.sum() < y.size:
            aps.append(average_precision_score(y, s[keep]))
            aurocs.append(roc_auc_score(y, s[keep]))
    dh = m['scores']['DH']
    assert dh['per_image']['n_images'] == len(aps)
    assert dh['per_image']['ap'] == pytest.approx(np.mean(aps), abs=1e-9)
    assert dh['per_image']['auroc'] == pytest.approx(np.mean(aurocs), abs=1e-9)
    s, y = np.concatenate(pooled_s), np.concatenate(pooled_y)
    assert dh['pooled']['ap'] == pytest.approx(average_precision_score(y, s), abs=1e-3)
    assert dh['pooled']['auroc'] == pytest.approx(roc_auc_score(y, s), abs=1e-4)


HAND = (40, 60)


def _hand_folder(root: Path) -> dict[str, np.ndarray]:
    """Two images of binary labels (1 anomaly, 0 normal, 255 ignored) and their scores, keyed
    by image hash. Image 0: anomaly A (6x6) scored with one extra column beside it, a 12 px
    fragment one pixel further right, a 4 px blob, anomaly B (4x5) missed, a 12 px blob on
    ignored labels. Image 1: anomaly C (5x5) scored exactly. Scores 1 there, -0.3 elsewhere."""
    import cv2
    (root / 'images').mkdir(parents=True)
    (root / 'labels').mkdir()
    scores = {}
    for i in range(2):
        label = np.zeros(HAND, np.uint8)
        score = np.full(HAND, -0.3, np.float32)  # not on a histogram bin edge
        if i == 0:
            label[5:11, 5:11] = 1
            score[5:11, 5:12] = score[5:11, 13:15] = score[30:32, 5:7] = 1.0
            label[25:29, 40:45] = 1
            label[35:40, 30:40] = 255
            score[36:39, 32:36] = 1.0
        else:
            label[10:15, 20:25] = 1
            score[10:15, 20:25] = 1.0
        image = np.full((*HAND, 3), 40 + 100 * i, np.uint8)
        cv2.imwrite(str(root / 'images' / f'{i}.png'), image)
        cv2.imwrite(str(root / 'labels' / f'{i}.png'), label)
        scores[_key(image)] = score
    return scores


def test_component_metrics_of_a_hand_made_mask(tmp_path):
    """Mask score > 0.5: sIoU A 36/42, B 0, C 1; PPV 36/42, 0 (fragment), 0 (blob), 1; the blob
    on ignored labels is dropped. TP 2, FN 1, FP 2 at every tau: F1 4/7."""
    scores = _hand_folder(tmp_path / 'hand')

    def predict(image):
        return np.zeros(image.shape[:2], np.int64), {'DH': scores[_key(image)]}

    facts = {**FACTS, 'thresholds': {'tpr95': -1.0, 'fpr1': 0.5}, 'default_threshold': 'fpr1'}
    m = run_evaluation(predict, facts, tmp_path / 'hand', ['DH'], tmp_path / 'out',
                       progress=False, labels='binary')
    components = m['scores']['DH']['components']
    assert components['threshold'] == {'rule': 'default', 'name': 'fpr1', 'value': 0.5}
    assert (components['n_gt'], components['n_pred']) == (3, 4)
    assert components['siou'] == pytest.approx((36 / 42 + 0 + 1) / 3)
    assert components['ppv'] == pytest.approx((36 / 42 + 0 + 0 + 1) / 4)
    assert components['tp'] == [2] * 11 and components['fn'] == [1] * 11
    assert components['fp'] == [2] * 11
    assert components['f1_mean'] == pytest.approx(4 / 7)
    assert "default threshold 'fpr1' = 0.5" in m['protocols']['components']
    assert m['closed_miou'] is None  # binary labels: the components need no class ids
    table = (tmp_path / 'out' / 'table.md').read_text()
    assert '| DenseHybrid | DH | fpr1 = 0.5 | 61.90 | 46.43 | 57.14 | 3 / 4 |' in table
    row = evaluate_command._row(m['scores']['DH'])
    assert (row['sIoU'], row['PPV'], row['mean_F1']) == (61.9, 46.43, 57.14)
    assert row['component_threshold'] == 'fpr1 = 0.5'

    # without a default threshold: the open-mIoU rule, on the only group itself. B is never
    # scored, so TPR > 0.95 needs a threshold below -0.3: everything is flagged, one component
    # per image over all its evaluated pixels (2350 and 2400), none good enough
    m = run_evaluation(predict, FACTS, tmp_path / 'hand', ['DH'], tmp_path / 'out2',
                       progress=False, labels='binary')
    components = m['scores']['DH']['components']
    assert components['threshold']['rule'] == 'open_miou'
    assert components['threshold']['per_town']['all'] < -0.3
    assert (components['n_gt'], components['n_pred']) == (3, 2)
    assert components['siou'] == pytest.approx((36 / 2330 + 20 / 2314 + 25 / 2400) / 3)
    assert components['ppv'] == pytest.approx((56 / 2350 + 25 / 2400) / 2)
    assert components['f1_mean'] == 0.0
    assert 'open-mIoU threshold of each town' in m['protocols']['components']


def _checkpoint(path: Path, outlier_head: bool = True) -> Path:
    torch.manual_seed(0)
    model = SwiftNet(K, outlier_head=outlier_head)
    with torch.no_grad():  # spread the outputs so that the scores are not all tied
        model.class_head.conv.weight.mul_(5)
        if outlier_head:
            model.outlier_head.conv.weight.mul_(5)
    method = 'densehybrid' if outlier_head else 'nflowjs'
    cfg = load_config(ROOT / 'training' / 'configs' / f'{method}.yaml')
    ckpt_io.save_checkpoint({
        'format': ckpt_io.FORMAT, 'version': ckpt_io.VERSION, 'code_version': 'test',
        'method': method, 'config': cfg.to_dict(), 'step': 0, 'epoch': 0, 'finished': True,
        'segmenter': {'config': model.config(), 'state': model.state_dict()}, 'flow': None,
    }, path)
    return path


def _run_command(argv):
    parser = argparse.ArgumentParser()
    evaluate_command.add_arguments(parser)
    return evaluate_command.run(parser.parse_args(argv))


def test_command_on_a_tiny_checkpoint(data, tmp_path):
    ckpt = _checkpoint(tmp_path / 'tiny.pt')
    out = tmp_path / 'eval'
    summary = _run_command(['--checkpoint', str(ckpt), '--data', str(data), '--scores',
                            'DH,OP,OPxMS,JSD', '--out', str(out), '--no-progress',
                            '--device', 'cpu'])
    assert summary['method'] == 'densehybrid' and summary['images'] == 6
    metrics = json.loads((out / 'metrics.json').read_text())
    for score in ('DH', 'OP', 'OPxMS', 'JSD'):
        components = metrics['scores'][score]['components']
        row = summary['scores'][score]
        assert row['component_threshold'].startswith('tpr95, other town (t5 ')
        assert row['sIoU'] == round(100 * components['siou'], 2)
        assert 0 <= components['f1_mean'] <= 1
    assert list(metrics['scores']) == ['DH', 'OP', 'OPxMS', 'JSD']
    assert metrics['scores']['OP']['temperature'] == 2.0
    assert metrics['scores']['DH']['temperature'] is None
    table = (out / 'table.md').read_text().splitlines()
    header = ('| Method | Aux. data | Anomaly score | AP | FPR95 | AUROC | closed mIoU | '
              'open IoU |')
    rows = table[table.index(header) + 2:table.index(header) + 6]
    assert [r.split('|')[3].strip() for r in rows] == ['DH', 'OP', 'OPxMS', 'JSD']
    dh = metrics['scores']['DH']
    assert rows[0].split('|')[4].strip() == f'{100 * dh["per_image"]["ap"]:.2f}'
    assert rows[0].split('|')[1].strip() == 'DenseHybrid' and rows[0].split('|')[2].strip() == '✓'
    for name in ('pr_curves.png', 'roc_curves.png'):
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # Recompute the DH per-image AP straight from the network and scikit-learn.
    predict, _ = checkpoint_predictor(ckpt, ['DH'], 'cpu')
    aps = []
    for town in ('t5', 't6'):
        ds = StreetHazards(data, 'test', towns=[town])
        for i in range(len(ds)):
            item = ds[i]
            _, maps = predict(item['image'].numpy().transpose(1, 2, 0))
            ood = item['ood'].numpy()
            keep = ood <= 1
            y = ood[keep] == 1
            if 0 < y.sum() < y.size:
                aps.append(average_precision_score(y, maps['DH'][keep]))
    assert dh['per_image']['ap'] == pytest.approx(np.mean(aps), abs=1e-9)
    assert dh['per_image']['n_images'] == len(aps)


def test_bad_requests_get_clear_errors(data, tmp_path):
    ckpt = _checkpoint(tmp_path / 'nohead.pt', outlier_head=False)
    with pytest.raises(ConfigError, match='need the outlier head'):
        evaluate(str(ckpt), str(data), 'DH', str(tmp_path / 'e'), progress=False)
    with pytest.raises(ConfigError, match='unknown score'):
        parse_scores('DH,XYZ')
    with pytest.raises(ConfigError, match='exactly one'):
        evaluate(None, str(data), 'DH', str(tmp_path / 'e'))
    with pytest.raises(DataError, match='no test town'):
        evaluate(str(ckpt), str(tmp_path), 'JSD', str(tmp_path / 'e'), progress=False)
    with pytest.raises(ArtifactError, match='does not exist'):
        evaluate(str(tmp_path / 'missing.pt'), str(data), 'JSD', str(tmp_path / 'e'))


@pytest.mark.slow
def test_artifact_evaluation_matches_the_checkpoint(data, tmp_path):
    """The exported DH graph at the test image size gives the checkpoint's numbers."""
    from training.export import DeployModel, export_artifact
    ckpt = _checkpoint(tmp_path / 'tiny.pt')
    model = ckpt_io.build_segmenter(ckpt_io.load_checkpoint(ckpt))
    export_artifact(DeployModel(model, 'DH'), tmp_path / 'tiny', size=(48, 96),
                    metadata={'method': 'densehybrid'})
    a = evaluate(str(ckpt), str(data), 'DH', str(tmp_path / 'ckpt'), device='cpu',
                 progress=False)
    b = evaluate(None, str(data), 'DH', str(tmp_path / 'art'), device='cpu',
                 artifact=str(tmp_path / 'tiny.json'), backend='onnxruntime', progress=False)
    assert b['model']['source'] == 'artifact' and b['model']['backend'] == 'onnxruntime'
    assert b['closed_miou'] == pytest.approx(a['closed_miou'], abs=1e-3)
    for key in ('ap', 'auroc', 'fpr95'):
        assert b['scores']['DH']['per_image'][key] == pytest.approx(
            a['scores']['DH']['per_image'][key], abs=1e-3)
    with pytest.raises(ConfigError, match="computes the score 'DH' only"):
        evaluate(None, str(data), 'OP', str(tmp_path / 'x'), artifact=str(tmp_path / 'tiny.json'))


def test_cli_runs_evaluate_and_prints_json(data, tmp_path, monkeypatch, capsys):
    from anomaly_seg_tools import cli
    monkeypatch.setitem(cli.COMMANDS, 'evaluate', ('training.evaluate_command', 'evaluate'))
    ckpt = _checkpoint(tmp_path / 'tiny.pt', outlier_head=False)
    code = cli.main(['--json', 'evaluate', '--checkpoint', str(ckpt), '--data', str(data),
                     '--scores', 'JSD,MSP', '--out', str(tmp_path / 'o'), '--no-progress',
                     '--limit', '1'])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report['method'] == 'nflowjs' and report['images'] == 2
    assert set(report['scores']) == {'JSD', 'MSP'}
    code = cli.main(['evaluate', '--checkpoint', str(tmp_path / 'none.pt'), '--data', str(data),
                     '--out', str(tmp_path / 'o')])
    assert code == 2 and 'does not exist' in capsys.readouterr().err
