"""The training loop of every method: `anomaly-seg train` and `python -m training.train`.

Built from one `Config` (training/config.py):
- Segmenter: SwiftNet-RN18 (`model.*`), optionally initialised from a stage-1 checkpoint
  (`model.init_checkpoint`; the outlier head is new). Adam with two parameter groups, decoder
  (`optim.lr`, `optim.weight_decay`) and encoder (`optim.encoder_lr`,
  `optim.encoder_weight_decay`), and cosine decay to `optim.lr_min` **per step** over
  T = epochs x steps per epoch (or `train.max_steps` when that is smaller, so a short run still
  ends at lr_min).
- Flow (flow methods, flow_pretrain): DenseFlow (`flow.preset`, `flow.checkpoint`) with Adamax;
  its lr is multiplied by `flow.lr_decay` after every epoch.
- One step is `training.step.compute_step` (the gradient routing of methods.md §3.3); this loop
  owns the optimisers, schedulers and GradScalers. AMP only on CUDA (`train.amp`), the flow in
  float32, one GradScaler per optimiser.
- DDP through torchrun (env:// rendezvous; gloo on CPU, nccl on CUDA): `train.batch_size` is
  the global batch, split evenly over the processes; DistributedSampler with set_epoch; the
  segmenter is wrapped in DistributedDataParallel, the flow's gradients (its samples and MLE are
  not `forward` calls) are averaged with one all-reduce per step. Rank 0 validates, logs and
  writes checkpoints.
- Repeatable: `train.seed` seeds model init, data order, jitter, patch layouts and flow noise;
  every random source is explicit or saved, so `--resume` continues bitwise exactly on the CPU
  (on CUDA up to cuDNN/atomic-add nondeterminism).
- Outputs in `train.out_dir` (or `--out`): config.yaml, log.jsonl (losses, learning rates,
  validation metrics, checkpoints), checkpoints/step_NNNNNNN.pt every `train.checkpoint_every`
  steps (the newest 3 kept) and checkpoints/final.pt at the end.
- Validation after every `train.val_every` epochs on the val split: closed mIoU on the clean
  images and, with `negatives.paste_val`, AP / FPR95 / AUROC of the config's scores with
  negatives pasted (flow samples or ADE20k) from a fixed seed, so epochs are comparable;
  flow_pretrain reports val bits/dim.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
import random
import signal
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
import yaml

from anomaly_seg_node.errors import ArtifactError, ConfigError, DataError
from anomaly_seg_node.labels import IGNORE_ID
from anomaly_seg_node.metrics import ConfusionMatrix, PooledOOD
from training import checkpoint as ckpt_io
from training.config import Config, load_config
from training.data.ade20k import ADE20kNegatives
from training.data.registry import open_split
from training.data.transforms import JointTransform
from training.evaluate import score_temperature, usable_scores
from training.negatives import crop_at, draw_patch_layout, paste_ade_negatives, paste_patches
from training.networks.flow import PRESETS, DenseFlow
from training.networks.flow_modules import ActNorm2d
from training.networks.swiftnet import SwiftNet
from training.scores import anomaly_score
from training.step import compute_step

KEEP_CHECKPOINTS = 3
# Test hook: SIGKILL this process right after the checkpoint of this step is written.
KILL_AT_STEP_ENV = 'ANOMALY_SEG_TEST_KILL_AT_STEP'
# Keys that may differ between a checkpoint's config and the resumed run's: they do not change
# what is computed (where things live, how often to log or save), except train.max_steps and
# train.epochs: a larger value continues the run, and the cosine decay is stretched over the new
# total (a warm restart at the stretched schedule's rate).
RESUME_MAY_CHANGE = frozenset({
    'train.max_steps', 'train.epochs', 'train.checkpoint_every', 'train.log_every',
    'train.out_dir', 'train.device', 'data.root', 'data.num_workers', 'negatives.ade_root',
    'flow.checkpoint', 'model.init_checkpoint', 'model.pretrained'})


@dataclasses.dataclass
class _Dist:
    """Process group facts: rank, world size, local rank, device; `owned` if we created it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


# ---- set-up -----------------------------------------------------------------------------------


def _init_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device_name == 'auto':
        device_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device_name.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f'train.device={device_name} but CUDA is not available on this '
                          'machine; set train.device=cpu (or auto)')
    if device_name not in ('cpu', 'cuda') and not device_name.startswith('cuda:'):
        raise ConfigError(f'train.device must be auto, cpu, cuda or cuda:N, found '
                          f'{device_name!r}')
    info = _Dist(rank, world, local_rank)
    if device_name == 'cuda':
        device = torch.device('cuda', local_rank if world > 1 else torch.cuda.current_device())
    else:
        device = torch.device(device_name)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        dist.init_process_group(backend=backend, init_method='env://')
        info.owned = True
    return info, device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank_seed(seed: int, rank: int, stream: int) -> int:
    """A distinct, reproducible seed per (seed, rank, stream)."""
    return int(np.random.SeedSequence([seed, rank, stream]).generate_state(1)[0])


def build_segmenter(cfg: Config) -> SwiftNet:
    """SwiftNet from `model.*`, with the stage-1 weights of `model.init_checkpoint` if set."""
    model = SwiftNet(cfg.model.num_classes, outlier_head=cfg.model.outlier_head,
                     pretrained=cfg.model.pretrained)
    path = cfg.model.init_checkpoint
    if path:
        init = ckpt_io.load_checkpoint(path)
        entry = init.get('segmenter')
        if entry is None:
            raise ConfigError(f'model.init_checkpoint {path} holds no segmenter (method '
                              f'{init.get("method")}); pass a closed_set checkpoint')
        if entry['config'].get('num_classes') != cfg.model.num_classes:
            raise ConfigError(f'model.init_checkpoint {path} has '
                              f'{entry["config"].get("num_classes")} classes but '
                              f'model.num_classes={cfg.model.num_classes}; make them equal')
        # The outlier head is new in stage 2 (or dropped for NFlowJS): only it may differ.
        result = model.load_state_dict(entry['state'], strict=False)
        other = [k for k in [*result.missing_keys, *result.unexpected_keys]
                 if not k.startswith('outlier_head.')]
        if other:
            raise ConfigError(f'model.init_checkpoint {path} does not fit SwiftNet: keys '
                              f'{other[:5]} differ (only outlier_head.* may); pass a SwiftNet '
                              'checkpoint of anomaly-seg train')
    return model


def build_flow(cfg: Config) -> DenseFlow:
    """DenseFlow from `flow.preset`, with the weights of `flow.checkpoint` if set."""
    path = cfg.flow.checkpoint
    if not path:
        return DenseFlow.from_preset(cfg.flow.preset)
    flow = ckpt_io.build_flow(ckpt_io.load_checkpoint(path))
    stored = flow.config()
    preset = PRESETS[cfg.flow.preset]
    if any(stored.get(k) != (list(v) if isinstance(v, tuple) else v) for k, v in preset.items()):
        raise ConfigError(f'flow.checkpoint {path} holds a different DenseFlow than '
                          f'flow.preset={cfg.flow.preset!r}; set flow.preset to the preset it '
                          'was trained with')
    return flow.train()


def _param_groups(cfg: Config, model: SwiftNet) -> list[dict[str, Any]]:
    o = cfg.optim
    return [
        {'params': list(model.random_init_parameters()), 'lr': o.lr,
         'weight_decay': o.weight_decay, 'name': 'decoder'},
        {'params': list(model.encoder_parameters()), 'lr': o.encoder_lr,
         'weight_decay': o.encoder_weight_decay, 'name': 'encoder'},
    ]


def cosine_factor(step: int, total: int, base_lr: float, lr_min: float) -> float:
    """lr(step) / base_lr for the cosine decay from base_lr to lr_min over `total` steps."""
    floor = min(lr_min, base_lr) / base_lr
    t = min(step, total) / max(total, 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def _scheduler(cfg: Config, opt: torch.optim.Optimizer, total: int
               ) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.optim.schedule == 'constant':
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    lambdas = [_cosine_lambda(total, g['lr'], cfg.optim.lr_min) for g in opt.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def _cosine_lambda(total: int, base: float, lr_min: float) -> Any:
    return lambda step: cosine_factor(step, total, base, lr_min)


def _flow_scheduler(cfg: Config, opt: torch.optim.Optimizer, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    decay = cfg.flow.lr_decay
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: decay ** (step // steps_per_epoch))


# ---- data -------------------------------------------------------------------------------------


class _Data:
    """Training data of one process: inlier crops and (for ADE20k methods) negatives."""

    def __init__(self, cfg: Config, info: _Dist, pin: bool) -> None:
        d = cfg.data
        crop = d.crop_size if isinstance(d.crop_size, int) else tuple(d.crop_size)
        transform = JointTransform(
            crop, tuple(d.jitter), d.flip, tuple(d.mean_fill), color_jitter=d.color_jitter,
            letterbox_hw=d.letterbox_hw, letterbox_prob=d.letterbox_prob)
        self.cfg = cfg
        self.info = info
        self.pin = pin
        self.train = open_split(d.dataset, d.root, 'train', d.mapping, transform,
                                seed=cfg.train.seed)
        if cfg.train.batch_size % info.world:
            raise ConfigError(f'train.batch_size={cfg.train.batch_size} is the global batch and '
                              f'must divide evenly over {info.world} processes; pick a multiple '
                              f'of {info.world}')
        self.batch = cfg.train.batch_size // info.world
        self.sampler = DistributedSampler(self.train, num_replicas=info.world, rank=info.rank,
                                          shuffle=True, seed=cfg.train.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.batch
        if self.steps_per_epoch < 1:
            raise DataError(f'the train split of {d.root} has {len(self.train)} images, fewer '
                            f'than one global batch of {cfg.train.batch_size}; lower '
                            'train.batch_size or add images')
        self.negatives = None
        if cfg.negatives_kind == 'ade20k':
            self.negatives = ADE20kNegatives(cfg.negatives.ade_root, cfg.negatives.ade_crop,
                                             seed=cfg.train.seed, scale=cfg.negatives.ade_scale)

    def _loader(self, dataset: Any, indices: Sequence[int], stream: int) -> DataLoader:
        # Its own generator: a loader draws its workers' base seed when it starts iterating,
        # which must not consume the global RNG (a resumed run starts one more loader).
        g = torch.Generator().manual_seed(_rank_seed(self.cfg.train.seed, self.info.rank,
                                                     stream))
        return DataLoader(dataset, batch_size=self.batch, sampler=list(indices),
                          num_workers=self.cfg.data.num_workers, drop_last=True,
                          pin_memory=self.pin, generator=g)

    def epoch(self, epoch: int, skip: int) -> Iterator[tuple[dict[str, Any], Any]]:
        """Batches of `epoch` from batch `skip` on: (inlier batch, ADE20k negatives or None)."""
        self.sampler.set_epoch(epoch)
        self.train.set_epoch(epoch)
        n = self.steps_per_epoch * self.batch
        indices = list(self.sampler)[:n][skip * self.batch:]
        inliers = iter(self._loader(self.train, indices, 2000 + epoch))
        negatives = None
        if self.negatives is not None:
            self.negatives.set_epoch(epoch)
            g = torch.Generator().manual_seed(
                _rank_seed(self.cfg.train.seed, self.info.rank, 1000 + epoch))
            neg_idx = torch.randint(len(self.negatives), (n,), generator=g).tolist()
            negatives = iter(self._loader(self.negatives, neg_idx[skip * self.batch:],
                                            3000 + epoch))
        for batch in inliers:
            yield batch, (tuple(next(negatives)) if negatives is not None else None)


# ---- validation ------------------------------------------------------------------------------


def _ood_labels(labels: torch.Tensor, ood: torch.Tensor) -> np.ndarray:
    """1 on pasted pixels, 0 on labelled inliers, 2 (ignored) on void."""
    out = torch.full_like(labels, 2, dtype=torch.uint8)
    out[labels != IGNORE_ID] = 0
    out[ood] = 1
    return out.cpu().numpy()


@torch.no_grad()
def validate(cfg: Config, segmenter: nn.Module | None, flow: nn.Module | None,
             device: torch.device, progress: bool = False) -> dict[str, Any]:
    """Closed mIoU on the val split and AP / FPR95 / AUROC with pasted negatives (fixed seed)."""
    d = cfg.data
    val = open_split(d.dataset, d.root, 'val', d.mapping)
    models = [m for m in (segmenter, flow) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    devices = [device] if device.type == 'cuda' else []
    seed = _rank_seed(cfg.train.seed, 0, 999)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            if cfg.method == 'flow_pretrain':
                return _validate_flow(cfg, flow, val, device, g)
            return _validate_segmenter(cfg, segmenter, flow, val, device, g, progress)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _validate_flow(cfg: Config, flow: nn.Module, val: Any, device: torch.device,
                   g: torch.Generator) -> dict[str, Any]:
    total, count = 0.0, 0
    for i in range(len(val)):
        image = val[i]['image'][None].to(device).float()
        layout = draw_patch_layout(cfg.negatives, 1, image.shape[2:], g)
        bpd = flow.bits_per_dim(crop_at(image, layout))
        total += float(bpd.sum())
        count += 1
    return {'val_bpd': total / count, 'val_images': count}


def _validate_segmenter(cfg: Config, segmenter: nn.Module, flow: nn.Module | None,
                        val: Any, device: torch.device, g: torch.Generator,
                        progress: bool) -> dict[str, Any]:
    has_head = bool(getattr(segmenter, 'has_outlier_head', False))
    scores = usable_scores(cfg.eval.scores, has_head)
    conf = ConfusionMatrix(cfg.model.num_classes, IGNORE_ID)
    kind = cfg.negatives_kind if cfg.negatives.paste_val else 'none'
    ade = None
    if kind == 'ade20k':
        ade = ADE20kNegatives(cfg.negatives.ade_root, cfg.negatives.ade_crop,
                              seed=cfg.train.seed + 1, scale=cfg.negatives.ade_scale)
    pooled = {name: PooledOOD(bits=16) for name in scores} if kind != 'none' else {}
    for i in tqdm(range(len(val)), desc='validate', leave=False, disable=not progress):
        item = val[i]
        image = item['image'][None].to(device).float()
        labels = item['label'][None].to(device)
        out = segmenter(image)
        conf.update(out['logits'].argmax(1).cpu().numpy(), labels.cpu().numpy())
        if not pooled:
            continue
        if kind == 'flow':
            layout = draw_patch_layout(cfg.negatives, 1, image.shape[2:], g)
            patch = flow.sample(1, layout.h, layout.w)
            pasted = paste_patches(image, labels, patch, layout)
        else:
            neg_image, neg_mask = ade[i % len(ade)]
            pasted = paste_ade_negatives(image, labels, neg_image[None], neg_mask[None], g)
        out = segmenter(pasted.image)
        ood = _ood_labels(pasted.labels, pasted.ood_mask)
        for name, acc in pooled.items():
            s = anomaly_score(name, out['logits'].float(), _outlier(out),
                              score_temperature(name, cfg.eval.temperature))
            acc.update(s.cpu().numpy(), ood)
    result: dict[str, Any] = {'val_miou': conf.compute()['miou'], 'val_images': len(val)}
    for name, acc in pooled.items():
        m = acc.compute()
        result[f'val_{name}'] = {'ap': m['ap'], 'fpr95': m['fpr95'], 'auroc': m['auroc']}
    return result


def _outlier(out: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    o = out.get('outlier_logits')
    return o.float() if o is not None else None


# ---- the loop ---------------------------------------------------------------------------------


class _Log:
    """log.jsonl on rank 0: one JSON object per line."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and keep_until_step is None:
            path.unlink(missing_ok=True)  # a new run: a new log
        elif enabled and path.is_file():
            # Resuming: drop what the interrupted run logged after the checkpoint.
            kept = [line for line in path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= keep_until_step]
            path.write_text(''.join(line + '\n' for line in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, 'a') as f:
                f.write(json.dumps({**record, 'time': round(time.time(), 3)}) + '\n')


def _step_of(line: str) -> int | None:
    """The step of a log line; None for a line cut short by a kill."""
    try:
        return int(json.loads(line).get('step', 0))
    except (ValueError, AttributeError):
        return None


def _initialise_flow(flow: DenseFlow, image: torch.Tensor, cfg: Config, info: _Dist) -> None:
    """Data-dependent ActNorm init on this batch's crops; rank 0's result is broadcast."""
    if all(bool(m.initialized) for m in flow.modules() if isinstance(m, ActNorm2d)):
        return
    g = torch.Generator().manual_seed(_rank_seed(cfg.train.seed, info.rank, 5))
    layout = draw_patch_layout(cfg.negatives, image.shape[0], image.shape[2:], g)
    with torch.no_grad():
        flow.train()
        flow.log_prob(crop_at(image.float(), layout).floor().clamp(0, 255))
    if info.world > 1:
        for tensor in [*flow.parameters(), *flow.buffers()]:
            dist.broadcast(tensor.data, src=0)


def _average_flow_grads(flow: nn.Module, world: int) -> None:
    """One all-reduce of the flow's flattened gradients (mean over processes)."""
    params = list(flow.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def _mean_over_ranks(values: Mapping[str, float], info: _Dist, device: torch.device
                     ) -> dict[str, float]:
    if info.world == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=device if device.type == 'cuda' else 'cpu')
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(keys, t.tolist(), strict=True)}


def _config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = '') -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            keys += _config_diff(va, vb, f'{prefix}{k}.')
        elif va != vb:
            keys.append(f'{prefix}{k}')
    return keys


def resolve_resume(cfg: Config, resume: str | None, out_dir: Path) -> Path | None:
    """The checkpoint to resume from: a path, 'auto' (newest in out_dir, or None) or None."""
    if resume is None:
        return None
    if resume == 'auto':
        return ckpt_io.latest_checkpoint(out_dir / 'checkpoints')
    path = Path(resume)
    if not path.is_file():
        raise ArtifactError(f'--resume {resume}: no such checkpoint; pass a .pt file from '
                            f'{out_dir / "checkpoints"} or --resume auto')
    return path


def train(cfg: Config, out_dir: str | os.PathLike | None = None, resume: str | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train `cfg.method`; returns a summary (final checkpoint, steps, last losses and val)."""
    start_time = time.time()
    info, device = _init_distributed(cfg.train.device)
    try:
        return _train(cfg, Path(out_dir or cfg.train.out_dir), resume, progress, info, device,
                      start_time)
    finally:
        if info.owned and dist.is_initialized():
            dist.destroy_process_group()


@dataclasses.dataclass
class _Run:
    """One process's training state: what a checkpoint holds and the loop advances."""

    cfg: Config
    info: _Dist
    device: torch.device
    out: Path
    amp: bool
    code: str
    segmenter: SwiftNet | None
    flow: DenseFlow | None
    data: _Data
    total: int  # steps of the whole run
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    scalers: dict[str, Any]
    patches: torch.Generator  # patch layouts and flow noise of this rank
    step: int = 0

    @property
    def ckpt_dir(self) -> Path:
        return self.out / 'checkpoints'

    @property
    def steps_per_epoch(self) -> int:
        return self.data.steps_per_epoch


def _train(cfg: Config, out: Path, resume: str | None, progress: bool, info: _Dist,
           device: torch.device, start_time: float) -> dict[str, Any]:
    resume_path, state, removed = _open_run(cfg, out, resume, info)
    run = _build(cfg, out, state is not None, info, device)
    if state is not None:
        _restore(run, state, resume_path)
    else:
        # Same init on every rank (above); from here each rank draws its own noise.
        _seed_everything(_rank_seed(cfg.train.seed, info.rank, 0))
    log = _Log(out / 'log.jsonl', info.main, run.step if state is not None else None)
    summary: dict[str, Any] = {
        'method': cfg.method, 'out_dir': str(out), 'device': str(device), 'amp': run.amp,
        'world_size': info.world, 'steps_per_epoch': run.steps_per_epoch,
        'total_steps': run.total, 'resumed_from': str(resume_path) if resume_path else None,
        'start_step': run.step, 'removed_temp_files': [str(p) for p in removed]}
    if state is not None and resume_path is not None and state.get('finished') \
            and run.step >= run.total:
        final_path, note = _complete_finished_run(run, state, resume_path, log)
        summary.update(final_checkpoint=str(final_path), steps=run.step, note=note)
        return summary
    _warn_if_nothing_is_saved(run)
    log.write({'kind': 'start', 'step': run.step, 'method': cfg.method,
               'world_size': info.world, 'device': str(device), 'amp': run.amp,
               'total_steps': run.total, 'steps_per_epoch': run.steps_per_epoch,
               'resumed_from': summary['resumed_from'], 'code_version': run.code})
    last_losses, last_val = _loop(run, log, progress)
    final, digests = _end(run, log, start_time)
    summary.update(steps=run.step, epochs=run.step / run.steps_per_epoch,
                   final_checkpoint=str(run.ckpt_dir / ckpt_io.FINAL_NAME),
                   last_checkpoint=str(final), losses=last_losses, val=last_val,
                   state_digest=digests[0], seconds=round(time.time() - start_time, 2))
    return summary


def _open_run(cfg: Config, out: Path, resume: str | None, info: _Dist
              ) -> tuple[Path | None, dict[str, Any] | None, list[Path]]:
    """The checkpoint to resume from and its contents (None, None for a new run), after the
    config and folder checks; rank 0 writes config.yaml and removes stale temporary files."""
    resume_path = resolve_resume(cfg, resume, out)
    state = ckpt_io.load_checkpoint(resume_path) if resume_path is not None else None
    if state is not None:
        changed = [k for k in _config_diff(state['config'], cfg.to_dict())
                   if k not in RESUME_MAY_CHANGE]
        if changed:
            raise ConfigError(f'cannot resume from {resume_path}: the config differs in '
                              f'{", ".join(changed)}; a resumed run continues with the stored '
                              f'config (only {", ".join(sorted(RESUME_MAY_CHANGE))} may '
                              'change): drop those overrides or start a new run')
    ckpt_dir = out / 'checkpoints'
    if state is None and ckpt_io.latest_checkpoint(ckpt_dir) is not None:
        raise ConfigError(f'the output folder {out} already holds checkpoints of a run; pass '
                          '--resume auto to continue it, or choose another --out')
    removed: list[Path] = []
    if info.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (out / 'config.yaml').write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        removed = ckpt_io.remove_stale_temp_files(ckpt_dir)
        if removed:
            print(f'note: removed {len(removed)} temporary checkpoint file(s) of killed runs '
                  f'from {ckpt_dir}: {", ".join(p.name for p in removed)}', file=sys.stderr)
    return resume_path, state, removed


def _build(cfg: Config, out: Path, resuming: bool, info: _Dist, device: torch.device) -> _Run:
    """Networks, data, optimisers, schedulers and scalers at step 0, seeded by train.seed."""
    _seed_everything(cfg.train.seed)
    train_segmenter = cfg.method != 'flow_pretrain'
    needs_flow = cfg.negatives_kind == 'flow' or cfg.method == 'flow_pretrain'
    # A resumed run gets its weights from the checkpoint: skip init files and downloads.
    start_cfg = cfg if not resuming else Config.from_dict(
        {**cfg.to_dict(), 'model': {**cfg.to_dict()['model'], 'init_checkpoint': None,
                                    'pretrained': False},
         'flow': {**cfg.to_dict()['flow'], 'checkpoint': None}})
    segmenter = build_segmenter(start_cfg).to(device).train() if train_segmenter else None
    flow = build_flow(start_cfg).to(device).train() if needs_flow else None

    data = _Data(cfg, info, pin=device.type == 'cuda')
    # Fail now, not after the first epoch, if the validation split is missing.
    open_split(cfg.data.dataset, cfg.data.root, 'val', cfg.data.mapping)
    spe = data.steps_per_epoch
    total = cfg.train.epochs * spe
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)

    optimizers: dict[str, torch.optim.Optimizer] = {}
    schedulers: dict[str, Any] = {}
    if segmenter is not None:
        o = cfg.optim
        optimizers['segmenter'] = torch.optim.Adam(_param_groups(cfg, segmenter),
                                                   betas=tuple(o.betas), eps=o.eps)
        schedulers['segmenter'] = _scheduler(cfg, optimizers['segmenter'], total)
    if flow is not None:
        f = cfg.flow
        optimizers['flow'] = torch.optim.Adamax(flow.parameters(), lr=f.lr, betas=tuple(f.betas),
                                                eps=f.eps, weight_decay=f.weight_decay)
        schedulers['flow'] = _flow_scheduler(cfg, optimizers['flow'], spe)
    amp = cfg.train.amp and device.type == 'cuda'
    scalers = {name: torch.amp.GradScaler('cuda') for name in optimizers} if amp else {}
    patches = torch.Generator().manual_seed(_rank_seed(cfg.train.seed, info.rank, 1))
    return _Run(cfg=cfg, info=info, device=device, out=out, amp=amp, code=_code_version(),
                segmenter=segmenter, flow=flow, data=data, total=total,
                optimizers=optimizers, schedulers=schedulers, scalers=scalers,
                patches=patches)


def _restore(run: _Run, state: Mapping[str, Any], resume_path: Path | None) -> None:
    """Weights, optimiser, scheduler and scaler states, step and random streams of `state`."""
    if run.segmenter is not None:
        run.segmenter.load_state_dict(state['segmenter']['state'])
    if run.flow is not None:
        run.flow.load_state_dict(state['flow']['state'])
    for name, opt in run.optimizers.items():
        opt.load_state_dict(state['optimizers'][name])
        run.schedulers[name].load_state_dict(state['schedulers'][name])
    for name, scaler in run.scalers.items():
        if state['scalers'].get(name):
            scaler.load_state_dict(state['scalers'][name])
    run.step = int(state['step'])
    info = run.info
    if int(state.get('world_size', 1)) == info.world:
        ckpt_io.set_rng_state(state['rng'][info.rank], run.patches)
    else:
        print(f'warning: {resume_path} was written by {state.get("world_size")} processes, '
              f'this run has {info.world}: the data order continues, the random streams '
              'restart from the seed (not bitwise exact)', file=sys.stderr)
        _seed_everything(_rank_seed(run.cfg.train.seed, info.rank, run.step))


def _complete_finished_run(run: _Run, state: dict[str, Any], resume_path: Path, log: _Log
                           ) -> tuple[Path, str]:
    """(final.pt, note) of a run resumed after its last step: nothing to train."""
    final_path = run.ckpt_dir / ckpt_io.FINAL_NAME
    note = 'the run had already finished; nothing to do'
    # A kill between the last step's checkpoint and final.pt leaves a finished run without
    # final.pt (or with the final.pt of a shorter run): write it now.
    if run.info.main and resume_path.resolve() != final_path.resolve() \
            and not ckpt_io.is_checkpoint_of_step(final_path, run.step):
        ckpt_io.save_checkpoint(state, final_path)
        log.write({'kind': 'checkpoint', 'step': run.step, 'path': str(final_path),
                   'finished': True, 'copied_from': str(resume_path)})
        note = f'the run had already finished; wrote its missing {final_path.name}'
    run.info.barrier()
    return final_path, note


def _warn_if_nothing_is_saved(run: _Run) -> None:
    every, left = run.cfg.train.checkpoint_every, run.total - run.step
    if run.info.main and left > 1 and (run.step // every + 1) * every >= run.total:
        print(f'warning: train.checkpoint_every={every} saves nothing before final.pt in the '
              f'{left} steps left, so a killed run starts over; set e.g. '
              f'train.checkpoint_every={max(left // 4, 1)}', file=sys.stderr)


def _save(run: _Run, log: _Log, finished: bool) -> Path:
    """checkpoints/step_NNNNNNN.pt (and final.pt when `finished`) on rank 0, every rank's
    random streams in it; the newest KEEP_CHECKPOINTS step files are kept."""
    info, step = run.info, run.step
    rngs = [ckpt_io.rng_state(run.patches)]
    if info.world > 1:
        rngs = [None] * info.world
        dist.all_gather_object(rngs, ckpt_io.rng_state(run.patches))
    path = ckpt_io.step_path(run.ckpt_dir, step)
    if info.main:
        segmenter, flow = run.segmenter, run.flow
        obj = {
            'format': ckpt_io.FORMAT, 'version': ckpt_io.VERSION, 'code_version': run.code,
            'method': run.cfg.method, 'config': run.cfg.to_dict(), 'step': step,
            'epoch': step // run.steps_per_epoch, 'finished': finished,
            'segmenter': None if segmenter is None else {
                'config': segmenter.config(), 'state': segmenter.state_dict()},
            'flow': None if flow is None else {
                'config': flow.config(), 'state': flow.state_dict()},
            'optimizers': {k: v.state_dict() for k, v in run.optimizers.items()},
            'schedulers': {k: v.state_dict() for k, v in run.schedulers.items()},
            'scalers': {k: v.state_dict() for k, v in run.scalers.items()},
            'rng': [_cpu_rng(r) for r in rngs], 'world_size': info.world,
        }
        ckpt_io.save_checkpoint(obj, path)
        if finished:
            ckpt_io.save_checkpoint(obj, run.ckpt_dir / ckpt_io.FINAL_NAME)
        ckpt_io.prune_checkpoints(run.ckpt_dir, KEEP_CHECKPOINTS)
        log.write({'kind': 'checkpoint', 'step': step, 'path': str(path),
                   'finished': finished})
    info.barrier()
    if os.environ.get(KILL_AT_STEP_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return path


def _loop(run: _Run, log: _Log, progress: bool
          ) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Steps from run.step to run.total with logging, validation and checkpoints; the last
    logged losses and validation."""
    cfg, info, device, flow = run.cfg, run.info, run.device, run.flow
    spe, total = run.steps_per_epoch, run.total
    model: nn.Module | None = run.segmenter
    if run.segmenter is not None and info.world > 1:
        model = nn.parallel.DistributedDataParallel(
            run.segmenter, device_ids=[device.index] if device.type == 'cuda' else None)
    bar = tqdm(total=total, initial=run.step, desc=cfg.method, unit='step',
               disable=not (progress and info.main), dynamic_ncols=True)
    last_losses: dict[str, float] = {}
    last_val: dict[str, Any] | None = None
    while run.step < total:
        epoch, skip = divmod(run.step, spe)
        for batch, negatives in run.data.epoch(epoch, skip):
            if flow is not None and run.step == 0:
                _initialise_flow(flow, batch['image'].to(device), cfg, info)
            losses = compute_step(cfg, model, flow, batch, negatives, run.patches,
                                  run.scalers or None)
            if flow is not None and info.world > 1:
                _average_flow_grads(flow, info.world)
            for name, opt in run.optimizers.items():
                if name in run.scalers:
                    run.scalers[name].step(opt)
                    run.scalers[name].update()
                else:
                    opt.step()
                run.schedulers[name].step()
            run.step += 1
            step = run.step
            bar.update(1)
            if step % cfg.train.log_every == 0 or step in (1, total):
                last_losses = _mean_over_ranks(losses, info, device)
                _log_step(run, log, last_losses)
                bar.set_postfix({k: f'{v:.4g}' for k, v in list(last_losses.items())[:3]})
            if step % spe == 0 and (step // spe) % cfg.train.val_every == 0:
                if info.main:
                    last_val = validate(cfg, run.segmenter, flow, device, progress)
                    log.write({'kind': 'val', 'step': step, 'epoch': step // spe, **last_val})
                info.barrier()
            if step % cfg.train.checkpoint_every == 0 and step < total:
                _save(run, log, finished=False)
            if step >= total:
                break
    bar.close()
    return last_losses, last_val


def _log_step(run: _Run, log: _Log, losses: Mapping[str, float]) -> None:
    lrs = {g.get('name', name): g['lr']
           for name, opt in run.optimizers.items() for g in opt.param_groups}
    record = {'kind': 'train', 'step': run.step, 'epoch': run.step / run.steps_per_epoch,
              'losses': dict(losses), 'lr': lrs}
    if run.scalers:
        record['loss_scale'] = {k: float(s.get_scale()) for k, s in run.scalers.items()}
    log.write(record)


def _end(run: _Run, log: _Log, start_time: float) -> tuple[Path, list[str]]:
    """The final checkpoint and every rank's state digest (equal when DDP kept them in sync)."""
    info, segmenter, flow = run.info, run.segmenter, run.flow
    if info.world > 1 and segmenter is not None:
        # BatchNorm statistics of the last forward are local; DDP would broadcast rank 0's at
        # the next forward (broadcast_buffers), and the checkpoint holds rank 0's: do it now.
        for buffer in segmenter.buffers():
            dist.broadcast(buffer, src=0)
    final = _save(run, log, finished=True)
    digests: list[Any] = [state_digest(segmenter, flow)]
    if info.world > 1:
        digests = [None] * info.world
        dist.all_gather_object(digests, state_digest(segmenter, flow))
    log.write({'kind': 'end', 'step': run.step, 'seconds': round(time.time() - start_time, 2),
               'state_digests': digests, 'ranks_in_sync': len(set(digests)) == 1})
    if len(set(digests)) != 1:
        print('warning: the processes ended with different weights (digests '
              f'{digests}); DDP lost synchronisation', file=sys.stderr)
    return final, digests


def state_digest(*models: nn.Module | None) -> str:
    """sha256 of the models' state dicts (names, dtypes, shapes, bytes): equal iff bitwise
    equal weights and buffers."""
    h = hashlib.sha256()
    for model in models:
        if model is None:
            continue
        for name, tensor in model.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f'{name}:{t.dtype}:{tuple(t.shape)};'.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cpu_rng(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def _code_version() -> str:
    from training.export import code_version
    return code_version()


# ---- command line -----------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> Config:
    """The run's config from --config + overrides, or from the --resume checkpoint."""
    overrides = list(args.overrides or [])
    if args.config:
        return load_config(args.config, overrides)
    resume = args.resume
    if resume == 'auto' and args.out:
        resume = ckpt_io.latest_checkpoint(Path(args.out) / 'checkpoints')
    if resume and resume != 'auto':
        stored = ckpt_io.checkpoint_config(ckpt_io.load_checkpoint(resume))
        return stored.with_overrides(overrides)
    raise ConfigError('anomaly-seg train needs --config training/configs/NAME.yaml (or '
                      '--resume CKPT, or --resume auto with an --out that holds checkpoints, to '
                      'continue a run with its stored config)')


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    cfg = config_from_args(args)
    out = args.out
    if out is None and args.resume and args.resume != 'auto' and not args.config:
        out = str(Path(args.resume).resolve().parent.parent)
    return train(cfg, out, args.resume, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m training.train',
                                     description='Train one of the methods (see anomaly-seg '
                                     'train --help); works under torchrun for DDP.')
    from training.train_command import add_arguments
    add_arguments(parser)
    parser.add_argument('--json', action='store_true', help='print the summary as JSON')
    args = parser.parse_args(argv)
    try:
        summary = run_from_args(args)
    except (ConfigError, DataError, ArtifactError) as e:
        print(f'train: error: {e}', file=sys.stderr)
        return 2
    if int(os.environ.get('RANK', '0')) == 0:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == '__main__':
    sys.exit(main())
