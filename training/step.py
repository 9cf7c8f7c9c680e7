"""One training step per method, with the gradient routing of methods.md §3.3.

`compute_step` zeroes the gradients, runs the forward passes and the backward passes and leaves
`.grad` ready on the segmenter S and the flow F; the caller owns the optimisers (and any
GradScalers) and steps them. The flow receives its gradients in ONE backward call,
`torch.autograd.backward([p, mle], grad_tensors=[g, 1])`, as DistributedDataParallel needs
(DESIGN.md, known traps):

- NFlowJS: S <- L_cls + 0.03 L_jsd; F <- 0.03 L_jsd (through the patch) + MLE.
- NF-Hybrid-JS: phase 1 pastes a no-grad sample, S <- L_cls + 0.03 L_x + 0.3 L_d; phase 2
  pastes a differentiable sample into the original crop, F <- 0.03 L_jsd + MLE, and S's
  gradients of phase 2 are never accumulated (only d/dp is taken).
- NF-Hybrid-LdLx / -Ld: one forward on x̃ with a detached copy p' of the sample pasted;
  g = d(0.03 L_x + 0.3 L_d)/dp' (Ld: d(0.3 L_d)/dp'); S <- the full loss; F <- g through p + MLE.
  L_cls never reaches F, although it sees the patch through S's receptive field.
- NF-OODHead: S <- L_cls + L_d on a detached patch; F <- MLE only.
- DenseHybrid / OODHead: ADE20k negatives; closed_set: L_cls; flow_pretrain: MLE on crops.

MLE is in bits/dim of the inlier pixels that the patch overwrote. With AMP (CUDA only) S runs
under autocast and the flow in float32 outside it; each model's loss is scaled by its own
GradScaler, passed in `scalers` as {'segmenter': ..., 'flow': ...}.
"""

from collections.abc import Mapping
import contextlib
from typing import Any

import torch
from torch import nn

from anomaly_seg_node.errors import ConfigError, DataError
from training.config import OUTLIER_HEAD_METHODS, Config
from training.losses import (
    flow_routed_loss,
    jsd_loss,
    mle_bits_per_dim,
    segmenter_loss,
    segmenter_terms,
)
from training.negatives import (
    Pasted,
    crop_at,
    draw_patch_layout,
    paste_ade_negatives,
    paste_patches,
)

Scalers = Mapping[str, Any]


def compute_step(cfg: Config, segmenter: nn.Module | None, flow: nn.Module | None,
                 batch: Mapping[str, torch.Tensor],
                 negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
                 rng: torch.Generator | None = None,
                 scalers: Scalers | None = None) -> dict[str, float]:
    """Run one step of `cfg.method`; returns the loss values as floats.

    batch: {'image': [N, 3, H, W] RGB 0..255 (uint8 or float), 'label': [N, H, W] int64}.
    negatives: ADE20k (images uint8 [N, 3, c, c], masks bool [N, c, c]) for densehybrid and
    oodhead. rng: the generator of patch sizes and positions (and ADE20k positions).
    """
    method = cfg.method
    needs_flow = cfg.negatives_kind == 'flow' or method == 'flow_pretrain'
    if needs_flow and flow is None:
        raise ConfigError(f'method {method} trains a flow, but no flow was given')
    if method != 'flow_pretrain' and segmenter is None:
        raise ConfigError(f'method {method} trains a segmenter, but none was given')
    if rng is None and method != 'closed_set':
        # A fresh generator per step would paste every step's negatives at the same places.
        raise ValueError(f"method {method} draws patch sizes and positions: pass the run's "
                         'torch.Generator (seeded once, its state saved in checkpoints)')
    image, labels = _batch(batch, segmenter if segmenter is not None else flow)
    amp = cfg.train.amp and image.is_cuda
    ctx = _Context(cfg, segmenter, flow, amp, scalers or {})
    for model in (segmenter, flow):
        if model is not None:
            model.zero_grad(set_to_none=True)
    if method == 'closed_set':
        return ctx.segmenter_only(image, labels)
    if method in ('densehybrid', 'oodhead'):
        if negatives is None:
            raise DataError(f'method {method} pastes ADE20k negatives; pass a batch of '
                            '(images, masks) from ADE20kNegatives')
        neg_images, neg_masks = negatives
        pasted = paste_ade_negatives(image, labels, neg_images, neg_masks, rng)
        return ctx.segmenter_only(pasted.image, pasted.labels, pasted.ood_mask)
    if method == 'flow_pretrain':
        return ctx.flow_pretrain(image, rng)
    if method in ('nflowjs', 'nf_hybrid_ldlx', 'nf_hybrid_ld'):
        return ctx.routed_joint(image, labels, rng)
    if method == 'nf_hybrid_js':
        return ctx.two_phase(image, labels, rng)
    if method == 'nf_oodhead':
        return ctx.detached_patch(image, labels, rng)
    raise ConfigError(f'unknown method {method}')  # Config already restricts it


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device('cpu')


def _batch(batch: Mapping[str, torch.Tensor],
           model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Image on the model's device in the model's dtype (float32, float64 in tests)."""
    if 'image' not in batch or 'label' not in batch:
        raise DataError(f'a training batch needs the keys image and label; got '
                        f'{sorted(batch)}')
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    image = batch['image'].to(device, dtype, non_blocking=True)
    labels = batch['label'].to(device, non_blocking=True).long()
    return image, labels


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, enabled=False)


class _Context:
    """What every step needs: the config, the two models, AMP state and scalers."""

    def __init__(self, cfg: Config, segmenter: nn.Module | None, flow: nn.Module | None,
                 amp: bool, scalers: Scalers) -> None:
        self.cfg = cfg
        self.method = cfg.method
        self.segmenter = segmenter
        self.flow = flow
        self.amp = amp
        self.scalers = scalers

    # ---- building blocks ---------------------------------------------------------------

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.float16)

    def _scale(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The current loss scale of model `name` as a 0-d tensor (1 without a scaler)."""
        one = torch.ones((), dtype=torch.float32, device=like.device)
        scaler = self.scalers.get(name)
        return scaler.scale(one) if scaler is not None else one

    def _forward(self, image: torch.Tensor, labels: torch.Tensor,
                 ood: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        with self._autocast(image.device):
            out = self.segmenter(image)
        if self.method in OUTLIER_HEAD_METHODS and 'outlier_logits' not in out:
            raise ConfigError(f'method {self.method} needs the outlier head; build the '
                              'segmenter with outlier_head=True (model.outlier_head=true)')
        terms = segmenter_terms(self.method, out, labels, ood, self.cfg.loss)
        return terms, segmenter_loss(self.method, terms, self.cfg.loss)

    def _sample(self, n: int, h: int, w: int, differentiable: bool) -> torch.Tensor:
        with _no_autocast(_device(self.flow)):
            return self.flow.sample(n, h, w, differentiable=differentiable)

    def _mle(self, inlier_crop: torch.Tensor) -> torch.Tensor:
        """Bits/dim of the (integer) inlier pixels, in float32 outside autocast."""
        crop = inlier_crop.detach().floor().clamp(0, 255)
        with _no_autocast(crop.device):
            if self.amp:
                crop = crop.float()
            return mle_bits_per_dim(self.flow.log_prob(crop), crop[0].numel())

    def _flow_backward(self, p: torch.Tensor | None, g: torch.Tensor | None,
                       mle: torch.Tensor) -> None:
        """ONE backward call into the flow: g through the sample p, plus the MLE term."""
        scale = self._scale('flow', mle)
        if p is None:
            torch.autograd.backward([mle], grad_tensors=[scale.to(mle.dtype)])
            return
        torch.autograd.backward(
            [p, mle], grad_tensors=[g.to(p.dtype) * scale.to(p.dtype), scale.to(mle.dtype)])

    def _routed_grad(self, routed: torch.Tensor, p_prime: torch.Tensor,
                     retain_graph: bool) -> torch.Tensor:
        """d(routed)/dp' without touching any parameter's .grad (scaled like S's loss)."""
        scale = self._scale('segmenter', routed)
        (g,) = torch.autograd.grad(routed * scale, p_prime, retain_graph=retain_graph)
        return g / scale.to(g.dtype)

    def _segmenter_backward(self, loss: torch.Tensor) -> None:
        (loss * self._scale('segmenter', loss)).backward()

    # ---- the steps -----------------------------------------------------------------------

    def segmenter_only(self, image: torch.Tensor, labels: torch.Tensor,
                       ood: torch.Tensor | None = None) -> dict[str, float]:
        if ood is None:
            ood = torch.zeros_like(labels, dtype=torch.bool)
        terms, loss = self._forward(image, labels, ood)
        self._segmenter_backward(loss)
        return _floats(terms, loss=loss)

    def flow_pretrain(self, image: torch.Tensor, rng: torch.Generator) -> dict[str, float]:
        layout = draw_patch_layout(self.cfg.negatives, image.shape[0], image.shape[2:], rng)
        mle = self._mle(crop_at(image, layout))
        self._flow_backward(None, None, mle)
        return _floats({}, mle=mle)

    def routed_joint(self, image: torch.Tensor, labels: torch.Tensor,
                     rng: torch.Generator) -> dict[str, float]:
        """NFlowJS, NF-Hybrid-LdLx, NF-Hybrid-Ld: one S forward, g routed into F."""
        n = image.shape[0]
        layout = draw_patch_layout(self.cfg.negatives, n, image.shape[2:], rng)
        p = self._sample(n, layout.h, layout.w, differentiable=True)
        p_prime = p.detach().requires_grad_(True)
        pasted = paste_patches(image, labels, p_prime, layout)
        terms, loss = self._forward(pasted.image, pasted.labels, pasted.ood_mask)
        routed = flow_routed_loss(self.method, terms, self.cfg.loss)
        g = self._routed_grad(routed, p_prime, retain_graph=True)
        self._segmenter_backward(loss)
        mle = self._mle(pasted.inlier_crop)
        self._flow_backward(p, g, mle)
        return _floats(terms, loss=loss, flow_routed=routed, mle=mle)

    def two_phase(self, image: torch.Tensor, labels: torch.Tensor,
                  rng: torch.Generator) -> dict[str, float]:
        """NF-Hybrid-JS: S learns on a detached patch; F learns from JSD on a second one."""
        n = image.shape[0]
        terms, loss, _ = self._segmenter_on_detached_patch(image, labels, rng)
        layout = draw_patch_layout(self.cfg.negatives, n, image.shape[2:], rng)
        p2 = self._sample(n, layout.h, layout.w, differentiable=True)
        p2_prime = p2.detach().requires_grad_(True)
        pasted = paste_patches(image, labels, p2_prime, layout)
        # No backward into S here: under DDP skip the gradient sync this forward would expect.
        no_sync = getattr(self.segmenter, 'no_sync', contextlib.nullcontext)
        with no_sync(), self._autocast(image.device):
            logits = self.segmenter(pasted.image)['logits']
        jsd = jsd_loss(logits, pasted.ood_mask)
        routed = self.cfg.loss.beta_jsd * jsd
        g = self._routed_grad(routed, p2_prime, retain_graph=False)
        mle = self._mle(pasted.inlier_crop)
        self._flow_backward(p2, g, mle)
        return _floats(terms, loss=loss, jsd=jsd, flow_routed=routed, mle=mle)

    def detached_patch(self, image: torch.Tensor, labels: torch.Tensor,
                       rng: torch.Generator) -> dict[str, float]:
        """NF-OODHead: S on a detached patch, F by MLE only."""
        terms, loss, pasted = self._segmenter_on_detached_patch(image, labels, rng)
        mle = self._mle(pasted.inlier_crop)
        self._flow_backward(None, None, mle)
        return _floats(terms, loss=loss, mle=mle)

    def _segmenter_on_detached_patch(self, image: torch.Tensor, labels: torch.Tensor,
                                     rng: torch.Generator
                                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, Pasted]:
        """S's step on a flow patch sampled without gradient: its terms, loss and the paste."""
        layout = draw_patch_layout(self.cfg.negatives, image.shape[0], image.shape[2:], rng)
        p = self._sample(image.shape[0], layout.h, layout.w, differentiable=False)
        pasted = paste_patches(image, labels, p, layout)
        terms, loss = self._forward(pasted.image, pasted.labels, pasted.ood_mask)
        self._segmenter_backward(loss)
        return terms, loss, pasted


def _floats(terms: Mapping[str, torch.Tensor], **extra: torch.Tensor) -> dict[str, float]:
    values = {**terms, **extra}
    return {name: float(value.detach()) for name, value in values.items()}
