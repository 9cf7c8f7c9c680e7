"""Typed configs: the shipped YAML files hold the paper's values; overrides and errors."""

import io
import json
from pathlib import Path
import re

import pytest
import torch
import yaml

from anomaly_seg_node.errors import ConfigError
from training.config import METHODS, Config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / 'training' / 'configs'
STAGE2 = ('densehybrid', 'oodhead', 'nflowjs', 'nf_hybrid_js', 'nf_hybrid_ldlx', 'nf_hybrid_ld',
          'nf_oodhead')
FLOW_JOINT = ('nflowjs', 'nf_hybrid_js', 'nf_hybrid_ldlx', 'nf_hybrid_ld', 'nf_oodhead')


CAMVID_CONFIGS = {'camvid_closed_set': 'closed_set', 'camvid_oodhead': 'oodhead',
                  'camvid_densehybrid': 'densehybrid'}


def test_one_config_file_per_method():
    paper = sorted(p.stem for p in CONFIGS.glob('*.yaml') if not p.stem.startswith('camvid_'))
    assert paper == sorted(METHODS)
    for method in METHODS:
        assert load_config(CONFIGS / f'{method}.yaml').method == method


@pytest.mark.parametrize('name', sorted(CAMVID_CONFIGS))
def test_camvid_configs_train_11_classes_on_camvid(name):
    cfg = load_config(CONFIGS / f'{name}.yaml')
    assert cfg.method == CAMVID_CONFIGS[name] and cfg.data.dataset == 'camvid'
    assert cfg.model.num_classes == 11 and cfg.data.mean_fill == (105, 108, 110)
    assert cfg.data.crop_size == (240, 320) and cfg.data.color_jitter == 0.3
    if cfg.method != 'closed_set':
        # negatives of at most half the crop's shorter side, as the paper's 384 in 768
        assert cfg.negatives.ade_crop <= 120 and cfg.model.outlier_head


def test_camvid_needs_11_classes_and_color_jitter_is_bounded():
    with pytest.raises(ConfigError, match='set model.num_classes=11'):
        load_config(CONFIGS / 'camvid_oodhead.yaml', ['model.num_classes=12'])
    with pytest.raises(ConfigError, match=r'data.color_jitter must lie in \[0, 1\)'):
        load_config(CONFIGS / 'camvid_oodhead.yaml', ['data.color_jitter=1.5'])
    with pytest.raises(ConfigError, match='data.dataset must be one of'):
        load_config(CONFIGS / 'camvid_oodhead.yaml', ['data.dataset=cityscapes'])


@pytest.mark.parametrize('method', STAGE2)
def test_stage2_configs_hold_the_papers_values(method):
    cfg = load_config(CONFIGS / f'{method}.yaml')
    assert cfg.data.crop_size == 768 and cfg.data.jitter == (0.5, 2.0) and cfg.data.flip
    assert cfg.data.mapping == 'densehybrid12' and cfg.model.num_classes == 12
    assert cfg.train.batch_size == 16 and cfg.train.epochs == 40
    assert (cfg.optim.lr, cfg.optim.encoder_lr, cfg.optim.lr_min) == (1e-5, 1e-5, 1e-7)
    assert cfg.optim.schedule == 'cosine'
    assert cfg.eval.temperature == 2.0
    if method in ('oodhead', 'nf_oodhead'):
        assert cfg.loss.beta_d == 1.0
    else:
        assert (cfg.loss.beta_x, cfg.loss.beta_d, cfg.loss.beta_jsd) == (0.03, 0.3, 0.03)
    assert cfg.model.outlier_head == (method != 'nflowjs')
    if method in FLOW_JOINT:
        assert cfg.negatives_kind == 'flow'
        assert (cfg.flow.lr, cfg.flow.betas, cfg.flow.eps) == (1e-6, (0.9, 0.999), 1e-7)
        assert cfg.flow.preset == '25-6' and cfg.flow.lr_decay == 1.0
        neg = cfg.negatives
        assert neg.square and (neg.min_size, neg.max_size, neg.step) == (16, 216, 8)
    else:
        assert cfg.negatives_kind == 'ade20k' and cfg.negatives.ade_crop == 384


def test_stage1_uses_swiftnets_recipe():
    cfg = load_config(CONFIGS / 'closed_set.yaml')
    assert cfg.train.epochs == 80 and cfg.model.pretrained and not cfg.model.outlier_head
    o = cfg.optim
    assert (o.lr, o.encoder_lr, o.weight_decay, o.encoder_weight_decay, o.lr_min) == (
        4e-4, 1e-4, 1e-4, 2.5e-5, 1e-6)


@pytest.mark.parametrize('method', FLOW_JOINT)
def test_official_code_values_are_one_key_away(method):
    text = (CONFIGS / f'{method}.yaml').read_text()
    # each disagreement with the official code is named in a comment on its key
    assert re.search(r'^  lr: 1\.0e-6 +# official code: 1\.0e-5$', text, re.M)
    assert re.search(r'^  square: true +# official code: false', text, re.M)
    cfg = load_config(CONFIGS / f'{method}.yaml', ['flow.lr=1e-5', 'negatives.square=false'])
    assert cfg.flow.lr == 1e-5 and not cfg.negatives.square


def test_densehybrid_ld_over_all_pixels_is_the_code_setting():
    text = (CONFIGS / 'densehybrid.yaml').read_text()
    assert re.search(r'^  ld_ignore_void: false +# DenseHybrid code', text, re.M)
    assert load_config(CONFIGS / 'densehybrid.yaml', ['loss.ld_ignore_void=true']) \
        .loss.ld_ignore_void


def test_overrides_are_parsed_with_the_field_types():
    cfg = load_config(CONFIGS / 'densehybrid.yaml', [
        'optim.lr=1e-4', 'train.batch_size=4', 'data.jitter=[0.75, 1.5]',
        'data.crop_size=[192, 384]', 'train.max_steps=7', 'train.out_dir=123',
        'model.init_checkpoint=runs/stage1/last.pt', 'eval.scores=[DH, OP]',
        'negatives.ade_scale=[0.25, 1]', 'data.letterbox_hw=[360, 640]'])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 4
    assert cfg.data.jitter == (0.75, 1.5) and cfg.data.crop_size == (192, 384)
    assert cfg.train.max_steps == 7
    assert cfg.train.out_dir == '123'
    assert cfg.model.init_checkpoint == 'runs/stage1/last.pt'
    assert cfg.eval.scores == ('DH', 'OP')
    assert cfg.negatives.ade_scale == (0.25, 1.0)
    assert cfg.data.letterbox_hw == (360, 640) and cfg.data.letterbox_prob == 0.5
    assert load_config(CONFIGS / 'densehybrid.yaml', ['train.max_steps=null']).train.max_steps \
        is None


@pytest.mark.parametrize('override, message', [
    ('optim.lrr=1', r'unknown key optim\.lrr; allowed keys in optim: lr, encoder_lr'),
    ('optimiser.lr=1', r'unknown key optimiser\.lr; allowed top-level keys: method, data'),
    ('train.batch_size=4.5', r'train\.batch_size must be int, found float 4\.5'),
    ('train.batch_size=four', r'train\.batch_size must be int'),
    ('optim.lr=fast', r'optim\.lr must be float'),
    ('data.flip=1', r'data\.flip must be bool'),
    ('data.jitter=[0.5]', r'data\.jitter must be a list of 2 values'),
    ('method=nflow', r"method must be one of 'closed_set'"),
    ('optim=1', r'override key optim must have the form optim\.<key>=value'),
    ('optim.lr', r'must look like section\.key=value'),
    ('train.batch_size=0', r'train\.batch_size must be positive'),
    ('negatives.min_size=12', r'multiples of 8'),
    ('data.jitter=[2, 0.5]', r'data\.jitter must be \[min, max\]'),
    ('data.letterbox_hw=[0, 640]', r'data\.letterbox_hw must be null or a positive'),
    ('data.letterbox_prob=2', r'data\.letterbox_prob must lie in \[0, 1\]'),
    ('negatives.ade_scale=[0.5, 2]', r'negatives\.ade_scale must be \[min, max\] with 0 < min'),
    ('model.outlier_head=false', r'set model\.outlier_head=true'),
    ('eval.scores=[DH, XYZ]', r"unknown score 'XYZ'"),
])
def test_bad_overrides_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / 'densehybrid.yaml', [override])


def test_nflowjs_refuses_an_outlier_head():
    with pytest.raises(ConfigError, match=r'set model\.outlier_head=false'):
        load_config(CONFIGS / 'nflowjs.yaml', ['model.outlier_head=true'])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match='cannot read config file'):
        load_config(tmp_path / 'missing.yaml')
    path = tmp_path / 'list.yaml'
    path.write_text('- 1\n- 2\n')
    with pytest.raises(ConfigError, match='must hold a mapping'):
        load_config(path)
    path.write_text('method: densehybrid\noptim:\n  lr: [1\n')
    with pytest.raises(ConfigError, match='not valid YAML'):
        load_config(path)
    path.write_text('method: densehybrid\noptim:\n  learning_rate: 1.0e-5\n')
    with pytest.raises(ConfigError, match=r'unknown key optim\.learning_rate'):
        load_config(path)
    path.write_text('method: densehybrid\noptim: 3\n')
    with pytest.raises(ConfigError, match='optim must be a mapping'):
        load_config(path)


def test_yaml_floats_without_a_dot_are_read_as_floats(tmp_path):
    # PyYAML reads 1e-5 as the string '1e-5'; the config still gets a float.
    path = tmp_path / 'x.yaml'
    path.write_text('method: oodhead\noptim:\n  lr: 1e-5\nloss:\n  beta_d: 1\n')
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-5 and cfg.loss.beta_d == 1.0 and isinstance(cfg.loss.beta_d, float)


def test_round_trips_through_dict_json_yaml_and_checkpoints():
    cfg = load_config(CONFIGS / 'nf_hybrid_ldlx.yaml', ['data.crop_size=[192, 384]'])
    data = cfg.to_dict()
    assert Config.from_dict(data) == cfg
    assert Config.from_dict(json.loads(json.dumps(data))) == cfg
    assert Config.from_dict(yaml.safe_load(yaml.safe_dump(data))) == cfg
    buffer = io.BytesIO()
    torch.save({'config': data}, buffer)
    buffer.seek(0)
    assert Config.from_dict(torch.load(buffer, weights_only=True)['config']) == cfg


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
