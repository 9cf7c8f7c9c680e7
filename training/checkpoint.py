"""Self-describing training checkpoints, written atomically and read with weights_only=True.

A checkpoint is one `torch.save` file holding only tensors and plain containers:

    format 'anomaly_seg.checkpoint', version 1, code_version, method,
    config            the resolved training config (Config.to_dict()),
    step, epoch       optimiser steps done; epochs completed,
    finished          True for the last checkpoint of a run,
    segmenter         {'config': SwiftNet.config(), 'state': state dict} or None,
    flow              {'config': DenseFlow.config(), 'state': state dict} or None,
    optimizers, schedulers, scalers   {'segmenter': ..., 'flow': ...} state dicts (None: absent),
    rng               one entry per rank: {'torch', 'cuda', 'numpy', 'python', 'patches'},
    world_size        processes that wrote it (resume restores the RNG of each rank).

`save_checkpoint` writes a temporary file in the same folder, fsyncs it and renames it over the
target (os.replace), so a crash while writing leaves the previous file intact (and a temporary
file, which `remove_stale_temp_files` deletes when a run starts or resumes). `load_checkpoint`
refuses anything that is not such a file with a message naming the problem and the fix;
`build_segmenter` / `build_flow` rebuild the networks from it (export and evaluation use them).
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from pathlib import Path
import random
import re
from typing import Any

import numpy as np
import torch

from anomaly_seg_node.errors import ArtifactError, ConfigError
from training.config import Config

FORMAT = 'anomaly_seg.checkpoint'
VERSION = 1
STEP_NAME = re.compile(r'^step_(\d+)\.pt$')
FINAL_NAME = 'final.pt'
# save_checkpoint's temporary file: `.NAME.tmp-PID`, PID of the writing process.
TEMP_NAME = re.compile(r'^\.(.+)\.tmp-(\d+)$')


def step_path(folder: str | os.PathLike, step: int) -> Path:
    """`folder/step_0000123.pt`: the checkpoint of a step (sorts by name = by step)."""
    return Path(folder) / f'step_{step:07d}.pt'


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `obj` to `path` atomically: temp file in the same folder, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, 'wb') as f:
            torch.save(dict(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def temp_path(path: str | os.PathLike) -> Path:
    """Where this process writes `path` before renaming it (named after its PID, so the
    files of processes that died while writing can be told apart)."""
    path = Path(path)
    return path.with_name(f'.{path.name}.tmp-{os.getpid()}')


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary checkpoint files in `folder` whose writing process no longer
    exists (a run killed while saving leaves one, as large as a checkpoint); the files of
    live processes, which may still be writing, stay. Returns the deleted paths.

    The PID is checked on this machine: on a folder shared between machines, a file of a
    process elsewhere whose PID is unused here counts as stale.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = TEMP_NAME.match(path.name)
        if match is None or not path.is_file() or _process_exists(int(match.group(2))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != 'posix':
        return True  # os.kill(pid, 0) would terminate it on Windows: keep the file
    if pid <= 0:
        return False  # 0 and negative PIDs would signal process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False
    return True


def is_checkpoint_of_step(path: str | os.PathLike, step: int) -> bool:
    """Whether `path` is a readable checkpoint of `step`."""
    try:
        return int(load_checkpoint(path)['step']) == step
    except ArtifactError:
        return False


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the folder's entry is on disk (POSIX).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = 'cpu'
                    ) -> dict[str, Any]:
    """Read and check a checkpoint written by `save_checkpoint` (torch.load weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f'checkpoint {path} does not exist; pass a .pt file written by '
                            'anomaly-seg train (e.g. runs/NAME/checkpoints/final.pt)')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or pickled files
        raise ArtifactError(
            f'checkpoint {path} could not be read with torch.load(weights_only=True) '
            f'({type(e).__name__}: {e}); it is truncated, corrupt or not an anomaly-seg '
            'checkpoint: use another checkpoint of the run or train again') from e
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        found = ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ArtifactError(f'{path} is not an anomaly-seg training checkpoint (format '
                            f'{found!r}, expected {FORMAT!r}); pass a file written by '
                            'anomaly-seg train')
    if ckpt.get('version') != VERSION:
        raise ArtifactError(f'checkpoint {path} has format version {ckpt.get("version")!r}, this '
                            f'code reads version {VERSION}; use the code version that wrote it '
                            f'({ckpt.get("code_version", "unknown")})')
    for key in ('config', 'step', 'segmenter', 'flow'):
        if key not in ckpt:
            raise ArtifactError(f'checkpoint {path} lacks the entry {key!r}; it was not written '
                                'completely by anomaly-seg train: use another checkpoint')
    return ckpt


def checkpoint_config(ckpt: Mapping[str, Any]) -> Config:
    """The resolved training config stored in the checkpoint."""
    try:
        return Config.from_dict(ckpt['config'])
    except ConfigError as e:
        raise ArtifactError(f'the config stored in the checkpoint is not valid for this code: '
                            f'{e}') from e


def build_segmenter(ckpt: Mapping[str, Any], strict: bool = True) -> torch.nn.Module:
    """The checkpoint's SwiftNet with its weights (CPU, eval mode)."""
    from training.networks.swiftnet import build_swiftnet
    entry = ckpt.get('segmenter')
    if entry is None:
        raise ArtifactError(f'the checkpoint of method {ckpt.get("method")!r} holds no '
                            'segmenter (flow_pretrain trains only the flow); pass a checkpoint of '
                            'closed_set or a stage-2 method')
    model = build_swiftnet(entry['config'])
    _load_state(model, entry['state'], 'segmenter', strict)
    return model.eval()


def build_flow(ckpt: Mapping[str, Any]) -> torch.nn.Module:
    """The checkpoint's DenseFlow with its weights (CPU, eval mode)."""
    from training.networks.flow import DenseFlow
    entry = ckpt.get('flow')
    if entry is None:
        raise ArtifactError(f'the checkpoint of method {ckpt.get("method")!r} holds no flow; '
                            'pass a checkpoint of flow_pretrain or of a flow method')
    model = DenseFlow.from_config(entry['config'])
    _load_state(model, entry['state'], 'flow', True)
    return model.eval()


def _load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str,
                strict: bool) -> None:
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ArtifactError(f'the {what} weights of the checkpoint do not fit the network '
                            f'rebuilt from its own config: {e}') from e


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest readable checkpoint in `folder` (final.pt, else the highest step), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.iterdir() if STEP_NAME.match(p.name)),
                        key=lambda p: int(STEP_NAME.match(p.name).group(1)), reverse=True)
    if (folder / FINAL_NAME).is_file():
        candidates.insert(0, folder / FINAL_NAME)
    for path in candidates:
        try:
            load_checkpoint(path)
        except ArtifactError:
            continue  # e.g. a file cut short by a full disk: fall back to the one before
        return path
    return None


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the `keep` newest step_*.pt files."""
    steps = sorted(p for p in Path(folder).iterdir() if STEP_NAME.match(p.name))
    for path in steps[:-keep] if keep > 0 else steps:
        path.unlink(missing_ok=True)


# ---- RNG states as plain values ---------------------------------------------------------------


def rng_state(patches: torch.Generator | None = None) -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, python, the patch generator)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': {'name': np_state[0], 'keys': torch.from_numpy(np_state[1].astype(np.int64)),
                  'pos': int(np_state[2]), 'has_gauss': int(np_state[3]),
                  'cached_gaussian': float(np_state[4])},
        'python': {'version': py_state[0], 'state': list(py_state[1]), 'gauss': py_state[2]},
        'patches': patches.get_state() if patches is not None else None,
    }


def set_rng_state(state: Mapping[str, Any], patches: torch.Generator | None = None) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state['torch'])
    if state.get('cuda') and torch.cuda.is_available():
        cuda = list(state['cuda'])[:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    np_state = state['numpy']
    np.random.set_state((np_state['name'], np_state['keys'].numpy().astype(np.uint32),
                         np_state['pos'], np_state['has_gauss'], np_state['cached_gaussian']))
    py_state = state['python']
    random.setstate((py_state['version'], tuple(py_state['state']), py_state['gauss']))
    if patches is not None and state.get('patches') is not None:
        patches.set_state(state['patches'])
