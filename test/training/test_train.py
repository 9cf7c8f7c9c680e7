"""The trainer: every method trains and checkpoints, resume is bitwise exact, DDP keeps the ranks
in sync, checkpoints are atomic (training/train.py, training/checkpoint.py).

Synthetic StreetHazards scenes at 32x64, the tiny DenseFlow preset, SwiftNet without ImageNet
weights. Training runs use one intra-op thread (restored afterwards): on shared 2-core machines
several threads per tiny convolution cost ~8x in wall time.
"""

import json
import math
import os
from pathlib import Path
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from anomaly_seg_node.errors import ArtifactError, ConfigError
from training import checkpoint as ckpt_io
from training.config import METHODS, load_config
from training.synth import write_dataset, write_negatives
from training.train import build_segmenter, cosine_factor, state_digest, train

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / 'training' / 'configs'
# 4 training images, batch 2: 2 steps per epoch.
TINY = ['data.crop_size=[32,64]', 'data.num_workers=0', 'flow.preset=tiny',
        'train.batch_size=2', 'train.checkpoint_every=1', 'train.log_every=1',
        'model.pretrained=false', 'negatives.max_size=32', 'negatives.ade_crop=24',
        'train.device=cpu']
FAST_METHODS = ('densehybrid', 'nf_hybrid_ldlx')


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('train_data')
    write_dataset(root / 'sh', train=4, val=2, test=4, size=(32, 64), seed=0, progress=False)
    write_negatives(root / 'ade', n=4, size=(32, 48), seed=0, progress=False)
    return root


def _config(method: str, data: Path, *extra: str):
    return load_config(CONFIGS / f'{method}.yaml',
                       [f'data.root={data / "sh"}', f'negatives.ade_root={data / "ade"}',
                        *TINY, *extra])


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / 'log.jsonl').read_text().splitlines()
    return [r for r in map(json.loads, lines) if r['kind'] == kind]


@pytest.fixture(scope='module')
def stage1(data, tmp_path_factory):
    """closed_set and flow_pretrain runs of 2 steps: the inits of every stage-2 method."""
    out = tmp_path_factory.mktemp('stage1')
    closed = train(_config('closed_set', data, 'train.max_steps=2'), out / 'closed',
                   progress=False)
    flow = train(_config('flow_pretrain', data, 'train.max_steps=2'), out / 'flow',
                 progress=False)
    return Path(closed['final_checkpoint']), Path(flow['final_checkpoint'])


def test_cosine_factor_runs_from_one_to_lr_min():
    assert cosine_factor(0, 100, 1e-5, 1e-7) == pytest.approx(1.0)
    assert cosine_factor(50, 100, 1e-5, 1e-7) == pytest.approx(0.5 * (1 + 1e-2))
    assert cosine_factor(100, 100, 1e-5, 1e-7) == pytest.approx(1e-2)
    assert cosine_factor(150, 100, 1e-5, 1e-7) == pytest.approx(1e-2)  # stays at lr_min


def test_stage1_checkpoints_are_self_describing(stage1):
    closed_path, flow_path = stage1
    closed = ckpt_io.load_checkpoint(closed_path)
    assert closed['method'] == 'closed_set' and closed['step'] == 2 and closed['finished']
    assert ckpt_io.checkpoint_config(closed).train.max_steps == 2
    assert closed['flow'] is None and set(closed['optimizers']) == {'segmenter'}
    assert closed['segmenter']['config']['outlier_head'] is False
    flow = ckpt_io.load_checkpoint(flow_path)
    assert flow['segmenter'] is None and set(flow['optimizers']) == {'flow'}
    assert all(isinstance(v, torch.Tensor) for v in flow['flow']['state'].values())
    # ActNorm's data-dependent init happened and is stored.
    inits = [v for k, v in flow['flow']['state'].items() if k.endswith('initialized')]
    assert inits and all(bool(v) for v in inits)
    val = _records(flow_path.parent.parent, 'val')
    assert val and math.isfinite(val[-1]['val_bpd'])


def test_stage2_starts_from_the_stage1_weights(data, stage1):
    closed_path, _ = stage1
    cfg = _config('densehybrid', data, f'model.init_checkpoint={closed_path}')
    model = build_segmenter(cfg)
    stored = ckpt_io.load_checkpoint(closed_path)['segmenter']['state']
    state = model.state_dict()
    for name, value in stored.items():
        assert torch.equal(state[name], value), name
    assert any(k.startswith('outlier_head.') for k in state)  # the new head


def test_init_checkpoint_with_other_classes_is_refused(data, stage1):
    cfg = _config('densehybrid', data, f'model.init_checkpoint={stage1[0]}',
                  'model.num_classes=13')
    with pytest.raises(ConfigError, match='num_classes'):
        build_segmenter(cfg)


@pytest.mark.parametrize('method', [
    pytest.param(m, marks=() if m in FAST_METHODS else pytest.mark.slow)
    for m in METHODS if m not in ('closed_set', 'flow_pretrain')])
def test_every_method_trains_two_steps_and_evaluate_reads_it(method, data, stage1, tmp_path):
    from training.evaluate import evaluate
    closed_path, flow_path = stage1
    cfg = _config(method, data, 'train.max_steps=2', f'model.init_checkpoint={closed_path}',
                  f'flow.checkpoint={flow_path}')
    summary = train(cfg, tmp_path / 'run', progress=False)
    final = ckpt_io.load_checkpoint(summary['final_checkpoint'])
    assert final['step'] == 2 and final['finished'] and final['method'] == method
    assert (final['flow'] is not None) == (cfg.negatives_kind == 'flow')
    # Training moved the weights away from stage 1.
    init = ckpt_io.load_checkpoint(closed_path)['segmenter']['state']
    moved = [k for k, v in init.items() if not torch.equal(final['segmenter']['state'][k], v)]
    assert moved
    logs = _records(tmp_path / 'run', 'train')
    assert [r['step'] for r in logs] == [1, 2]
    assert all(math.isfinite(v) for r in logs for v in r['losses'].values())
    assert logs[-1]['lr']['decoder'] == pytest.approx(cfg.optim.lr_min)  # cosine reached T
    val = _records(tmp_path / 'run', 'val')[-1]
    assert 0 <= val['val_miou'] <= 1
    for score in cfg.eval.scores:
        assert 0 <= val[f'val_{score}']['ap'] <= 1
    metrics = evaluate(summary['final_checkpoint'], data / 'sh', cfg.eval.scores,
                       tmp_path / 'eval', progress=False)
    assert set(metrics['scores']) == set(cfg.eval.scores)
    assert (tmp_path / 'eval' / 'metrics.json').is_file()


def test_resume_of_a_finished_run_does_nothing(data, stage1, tmp_path):
    closed_path, _ = stage1
    run = tmp_path / 'run'
    shutil.copytree(closed_path.parent.parent, run)
    before = {p.name: p.stat().st_mtime_ns for p in (run / 'checkpoints').iterdir()}
    cfg = _config('closed_set', data, 'train.max_steps=2')
    summary = train(cfg, run, resume='auto', progress=False)
    assert summary['steps'] == 2 and summary['note'] == (
        'the run had already finished; nothing to do')
    assert summary['final_checkpoint'] == str(run / 'checkpoints' / 'final.pt')
    assert {p.name: p.stat().st_mtime_ns for p in (run / 'checkpoints').iterdir()} == before


def test_resume_of_a_finished_run_without_final_pt_writes_it(data, stage1, tmp_path):
    """A kill between the last step's checkpoint (finished) and final.pt: --resume auto once
    said 'nothing to do' and reported a final.pt that did not exist."""
    closed_path, _ = stage1
    run = tmp_path / 'run'
    shutil.copytree(closed_path.parent.parent, run)
    (run / 'checkpoints' / 'final.pt').unlink()
    last = ckpt_io.step_path(run / 'checkpoints', 2)
    assert ckpt_io.load_checkpoint(last)['finished']
    cfg = _config('closed_set', data, 'train.max_steps=2')
    summary = train(cfg, run, resume='auto', progress=False)
    assert summary['resumed_from'] == str(last) and summary['steps'] == 2
    assert summary['note'] == 'the run had already finished; wrote its missing final.pt'
    final = ckpt_io.load_checkpoint(summary['final_checkpoint'])
    assert final['step'] == 2 and final['finished']
    assert state_digest(ckpt_io.build_segmenter(final)) == \
        state_digest(ckpt_io.build_segmenter(ckpt_io.load_checkpoint(closed_path)))
    assert _records(run, 'checkpoint')[-1]['copied_from'] == str(last)
    # A finished checkpoint resumed into another folder gets its final.pt there too.
    other = train(cfg, tmp_path / 'other', resume=str(last), progress=False)
    assert Path(other['final_checkpoint']).is_file()


def _dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    names = [f'.step_0000004.pt.tmp-{dead}', f'.final.pt.tmp-{dead}',
             f'.step_0000006.pt.tmp-{alive}', f'.step_0000006.pt.tmp-{os.getpid()}',
             'step_0000002.pt', 'notes.tmp-1', f'.x.tmp-{dead}.bak']
    for name in names:
        (tmp_path / name).write_bytes(b'partial')
    removed = ckpt_io.remove_stale_temp_files(tmp_path)
    assert removed == sorted([tmp_path / f'.final.pt.tmp-{dead}',
                              tmp_path / f'.step_0000004.pt.tmp-{dead}'])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    assert ckpt_io.remove_stale_temp_files(tmp_path / 'missing') == []
    assert ckpt_io.temp_path(tmp_path / 'a.pt').name == f'.a.pt.tmp-{os.getpid()}'


def test_resume_removes_stale_temp_files_of_killed_runs(data, stage1, tmp_path, capsys):
    """A run SIGKILLed while saving leaves a temporary file as large as a checkpoint; they
    were never removed (300 MB after a few kills)."""
    closed_path, _ = stage1
    run = tmp_path / 'run'
    shutil.copytree(closed_path.parent.parent, run)
    stale = run / 'checkpoints' / f'.step_0000003.pt.tmp-{_dead_pid()}'
    stale.write_bytes(b'cut short by SIGKILL')
    cfg = _config('closed_set', data, 'train.max_steps=3')
    summary = train(cfg, run, resume='auto', progress=False)
    assert summary['steps'] == 3 and not stale.exists()
    assert summary['removed_temp_files'] == [str(stale)]
    assert f'removed 1 temporary checkpoint file(s) of killed runs from {run / "checkpoints"}' \
        in capsys.readouterr().err


def test_a_run_that_would_not_checkpoint_says_so(data, tmp_path, capsys):
    cfg = _config('closed_set', data, 'train.max_steps=2', 'train.checkpoint_every=2')
    train(cfg, tmp_path / 'run', progress=False)
    assert ('warning: train.checkpoint_every=2 saves nothing before final.pt in the 2 steps '
            'left, so a killed run starts over; set e.g. train.checkpoint_every=1') \
        in capsys.readouterr().err


def _quick_start_train_commands() -> list[list[str]]:
    """The `anomaly-seg train` commands of the README's quick start, as argument lists."""
    text = (ROOT / 'README.md').read_text()
    section = text.split('## Quick start without a data set', 1)[1].split('\n## ', 1)[0]
    block = section.split('```bash', 1)[1].split('```', 1)[0].replace('\\\n', ' ')
    return [shlex.split(line)[2:] for line in block.splitlines()
            if line.startswith('anomaly-seg train ')]


def test_readme_quick_start_runs_checkpoint():
    """The quick start's budgets (400 and 800 steps) were below the configs' checkpoint_every
    of 1000, so its runs saved nothing to resume from."""
    commands = _quick_start_train_commands()
    assert len(commands) == 2
    for argv in commands:
        config = argv[argv.index('--config') + 1]
        overrides = [a for a in argv if '=' in a and not a.startswith('-')]
        cfg = load_config(ROOT / config, overrides)
        assert cfg.train.max_steps in (400, 800)
        assert cfg.train.checkpoint_every <= cfg.train.max_steps // 4, argv


def test_resume_refuses_a_changed_config(data, stage1, tmp_path):
    cfg = _config('closed_set', data, 'train.max_steps=2', 'optim.lr=0.1')
    with pytest.raises(ConfigError, match='optim.lr'):
        train(cfg, tmp_path, resume=str(stage1[0]), progress=False)


def test_resume_with_more_epochs_continues_on_the_stretched_cosine(data, tmp_path):
    """A finished 1-epoch run (2 steps) resumed with train.epochs=2 trains steps 3 and 4 with
    the learning rates of a 4-step cosine, not of the 2-step one it was started with."""
    first = train(_config('closed_set', data, 'train.epochs=1'), tmp_path, progress=False)
    assert first['steps'] == 2
    cfg = _config('closed_set', data, 'train.epochs=2')
    summary = train(cfg, tmp_path, resume='auto', progress=False)
    assert summary['steps'] == 4 and summary['start_step'] == 2
    state = ckpt_io.load_checkpoint(summary['final_checkpoint'])
    base = cfg.optim.lr
    expected = base * cosine_factor(4, 4, base, cfg.optim.lr_min)
    assert state['optimizers']['segmenter']['param_groups'][-1]['lr'] == pytest.approx(expected)
    assert [r['total_steps'] for r in _records(tmp_path, 'start')] == [2, 4]


def test_resume_auto_without_checkpoint_starts_fresh(data, tmp_path):
    cfg = _config('closed_set', data, 'train.max_steps=1')
    summary = train(cfg, tmp_path, resume='auto', progress=False)
    assert summary['resumed_from'] is None and summary['steps'] == 1
    # A second fresh run into the same folder would mix two runs' checkpoints.
    with pytest.raises(ConfigError, match='--resume auto'):
        train(cfg, tmp_path, progress=False)


def _child_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.mark.slow
def test_sigkilled_run_resumes_bitwise_exactly(data, stage1, tmp_path):
    """Killed with SIGKILL right after the checkpoint of step 3, resumed, it ends at step 5 with
    the weights, optimiser moments and RNG of an uninterrupted run: bitwise equal. 5 steps cross
    an epoch boundary (2 steps per epoch) and its validation."""
    closed_path, flow_path = stage1
    args = ['train.max_steps=5', f'model.init_checkpoint={closed_path}',
            f'flow.checkpoint={flow_path}']
    cfg = _config('nf_hybrid_ldlx', data, *args)
    reference = train(cfg, tmp_path / 'reference', progress=False)

    killed = tmp_path / 'killed'
    overrides = [f'data.root={data / "sh"}', f'negatives.ade_root={data / "ade"}', *TINY, *args]
    cmd = [sys.executable, '-m', 'training.train', '--config',
           str(CONFIGS / 'nf_hybrid_ldlx.yaml'), *overrides, '--out', str(killed),
           '--no-progress']
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(ANOMALY_SEG_TEST_KILL_AT_STEP='3'),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert ckpt_io.latest_checkpoint(killed / 'checkpoints').name == 'step_0000003.pt'
    assert not (killed / 'checkpoints' / 'final.pt').exists()

    resumed = train(cfg, killed, resume='auto', progress=False)
    assert resumed['start_step'] == 3 and resumed['steps'] == 5
    a = ckpt_io.load_checkpoint(reference['final_checkpoint'])
    b = ckpt_io.load_checkpoint(resumed['final_checkpoint'])
    for part in ('segmenter', 'flow'):
        for name, value in a[part]['state'].items():
            assert torch.equal(value, b[part]['state'][name]), f'{part}.{name}'
    for part in ('segmenter', 'flow'):
        sa, sb = a['optimizers'][part]['state'], b['optimizers'][part]['state']
        for i in sa:
            for key in sa[i]:
                assert torch.equal(sa[i][key], sb[i][key]), f'{part} optimiser {i}.{key}'
    assert torch.equal(a['rng'][0]['torch'], b['rng'][0]['torch'])
    assert reference['state_digest'] == resumed['state_digest']
    # The log holds each step once: what the killed run logged after step 3 was dropped.
    steps = [r['step'] for r in _records(killed, 'train')]
    assert steps == [1, 2, 3, 4, 5]
    assert [r['step'] for r in _records(killed, 'val')] == [2, 4]


@pytest.mark.slow
def test_ddp_two_cpu_processes_hold_identical_weights(data, stage1, tmp_path):
    """torchrun, 2 processes on gloo, global batch 2 (1 per rank): the segmenter under DDP and
    the flow with its all-reduced gradients end bitwise equal on both ranks."""
    closed_path, flow_path = stage1
    out = tmp_path / 'ddp'
    overrides = [f'data.root={data / "sh"}', f'negatives.ade_root={data / "ade"}', *TINY,
                 'train.max_steps=2', f'model.init_checkpoint={closed_path}',
                 f'flow.checkpoint={flow_path}']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
           '2', '-m', 'training.train', '--config', str(CONFIGS / 'nf_hybrid_ldlx.yaml'),
           *overrides, '--out', str(out), '--no-progress']
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    end = _records(out, 'end')[-1]
    assert len(end['state_digests']) == 2 and end['ranks_in_sync']
    assert _records(out, 'start')[-1]['world_size'] == 2
    final = ckpt_io.load_checkpoint(out / 'checkpoints' / 'final.pt')
    assert final['world_size'] == 2 and len(final['rng']) == 2
    # The ranks drew different noise (different flow patches), yet hold one set of weights.
    assert not torch.equal(final['rng'][0]['torch'], final['rng'][1]['torch'])
    seg, flow = ckpt_io.build_segmenter(final), ckpt_io.build_flow(final)
    assert state_digest(seg, flow) == end['state_digests'][0]
    init = ckpt_io.load_checkpoint(flow_path)['flow']['state']
    assert any(not torch.equal(final['flow']['state'][k], v) for k, v in init.items())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    first = {'format': ckpt_io.FORMAT, 'version': ckpt_io.VERSION, 'config': {}, 'step': 1,
             'segmenter': None, 'flow': None, 'weights': torch.arange(5)}
    ckpt_io.save_checkpoint(first, path)
    before = path.read_bytes()

    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # half written ...
        raise OSError('disk full')  # ... then the crash

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        ckpt_io.save_checkpoint({**first, 'step': 2, 'weights': torch.zeros(5)}, path)
    monkeypatch.setattr(torch, 'save', real_save)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pt']  # no temp file left
    loaded = ckpt_io.load_checkpoint(path)
    assert loaded['step'] == 1 and torch.equal(loaded['weights'], torch.arange(5))


def test_latest_checkpoint_skips_a_corrupt_newest_file(tmp_path):
    good = {'format': ckpt_io.FORMAT, 'version': ckpt_io.VERSION, 'config': {}, 'step': 4,
            'segmenter': None, 'flow': None}
    ckpt_io.save_checkpoint(good, ckpt_io.step_path(tmp_path, 4))
    ckpt_io.step_path(tmp_path, 6).write_bytes(b'PK\x03\x04 cut short')
    assert ckpt_io.latest_checkpoint(tmp_path) == ckpt_io.step_path(tmp_path, 4)
    assert ckpt_io.latest_checkpoint(tmp_path / 'missing') is None


def test_load_checkpoint_refuses_foreign_files(tmp_path):
    with pytest.raises(ArtifactError, match='does not exist'):
        ckpt_io.load_checkpoint(tmp_path / 'nope.pt')
    torch.save({'model': torch.zeros(1)}, tmp_path / 'plain.pt')
    with pytest.raises(ArtifactError, match='not an anomaly-seg training checkpoint'):
        ckpt_io.load_checkpoint(tmp_path / 'plain.pt')
    # A pickled object needs code execution to load: weights_only refuses it.
    torch.save({'format': ckpt_io.FORMAT, 'obj': np.random.default_rng(0)}, tmp_path / 'pk.pt')
    with pytest.raises(ArtifactError, match='weights_only'):
        ckpt_io.load_checkpoint(tmp_path / 'pk.pt')
    torch.save({'format': ckpt_io.FORMAT, 'version': 99}, tmp_path / 'future.pt')
    with pytest.raises(ArtifactError, match='version 99'):
        ckpt_io.load_checkpoint(tmp_path / 'future.pt')


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    import random
    g = torch.Generator().manual_seed(3)
    state = ckpt_io.rng_state(g)
    ckpt_io.save_checkpoint({'rng': [state]}, tmp_path / 'r.pt')
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    loaded = torch.load(tmp_path / 'r.pt', weights_only=True)['rng'][0]
    ckpt_io.set_rng_state(loaded, g)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])


def test_batch_size_must_divide_over_processes(data, monkeypatch):
    from training.train import _Data, _Dist
    cfg = _config('closed_set', data, 'train.batch_size=3')
    with pytest.raises(ConfigError, match='divide evenly over 2'):
        _Data(cfg, _Dist(rank=0, world=2), pin=False)


def test_train_command_parses_overrides_and_needs_a_config():
    import argparse

    from training import train_command
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    args = parser.parse_args(['--config', 'x.yaml', 'optim.lr=1e-4', 'train.max_steps=3',
                              '--resume', 'auto', '--out', 'o'])
    assert args.overrides == ['optim.lr=1e-4', 'train.max_steps=3']
    assert args.resume == 'auto' and args.out == 'o'
    from training.train import config_from_args
    with pytest.raises(ConfigError, match='--config'):
        config_from_args(parser.parse_args([]))


def test_resume_auto_reads_the_stored_config_from_out(stage1):
    import argparse

    from training import train_command
    from training.train import config_from_args
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    run_dir = stage1[0].parent.parent
    cfg = config_from_args(parser.parse_args(['--resume', 'auto', '--out', str(run_dir),
                                              'train.max_steps=5']))
    assert cfg.method == 'closed_set' and cfg.train.max_steps == 5
    with pytest.raises(ConfigError, match='--resume auto'):
        config_from_args(parser.parse_args(['--resume', 'auto', '--out', str(run_dir / 'x')]))


def test_letterboxed_pairs_and_shrunk_negatives_reach_the_training_data(data, stage1,
                                                                          tmp_path):
    from training.train import _Data, _Dist
    cfg = _config('densehybrid', data, 'train.max_steps=1', f'model.init_checkpoint={stage1[0]}',
                  'data.letterbox_hw=[360,640]', 'data.letterbox_prob=1',
                  'negatives.ade_scale=[0.25,0.5]')
    loaded = _Data(cfg, _Dist(), pin=False)
    assert loaded.train.transform.letterbox_hw == (360, 640)
    assert loaded.train.transform.letterbox_prob == 1.0
    assert loaded.negatives.scale == (0.25, 0.5)
    # 24-pixel crops shrunk to at most 12 pixels a side.
    assert all(int(loaded.negatives[i][1].sum()) <= 12 * 12 for i in range(len(loaded.negatives)))
    summary = train(cfg, tmp_path / 'run', progress=False)
    assert ckpt_io.load_checkpoint(summary['final_checkpoint'])['step'] == 1


def test_command_modules_do_not_import_torch():
    code = ('import sys; import training.train_command, training.evaluate_command; '
            'assert "torch" not in sys.modules, "torch imported"')
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, env=_child_env())


def test_cli_takes_overrides_before_and_after_flags(capsys):
    from anomaly_seg_tools import cli
    parser = cli.build_parser()
    args = cli.parse_args(parser, ['train', '--out', 'r', 'a.b=1', '--no-progress', 'c.d=2',
                                   '--resume', 'auto', 'e.f=[1,2]'])
    assert args.overrides == ['a.b=1', 'c.d=2', 'e.f=[1,2]']
    assert args.no_progress and args.resume == 'auto' and args.out == 'r'
    for argv in (['train', 'a.b=1', '--no-progress', 'stray'], ['synth', 'bag', '--out', 'b',
                                                                  'x=1']):
        with pytest.raises(SystemExit):
            cli.parse_args(parser, argv)
        assert 'unrecognized arguments' in capsys.readouterr().err


def test_cli_trains_and_resumes_with_the_stored_config(data, tmp_path, monkeypatch, capsys):
    from anomaly_seg_tools import cli
    monkeypatch.setitem(cli.COMMANDS, 'train', ('training.train_command', 'train'))
    overrides = [f'data.root={data / "sh"}', *TINY, 'train.max_steps=1']
    code = cli.main(['--json', 'train', '--config', str(CONFIGS / 'closed_set.yaml'),
                     *overrides, '--out', str(tmp_path / 'run'), '--no-progress'])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report['steps'] == 1 and report['method'] == 'closed_set'
    # --resume CKPT alone: the checkpoint's config, one override to go one step further.
    code = cli.main(['--json', 'train', '--resume', report['final_checkpoint'],
                     'train.max_steps=2', '--no-progress'])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report['start_step'] == 1 and report['steps'] == 2
    assert Path(report['out_dir']).resolve() == (tmp_path / 'run').resolve()
    code = cli.main(['train', '--config', str(CONFIGS / 'closed_set.yaml'), 'optim.nope=1'])
    assert code == 2 and 'optim.nope' in capsys.readouterr().err
