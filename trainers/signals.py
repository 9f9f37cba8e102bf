"""Instability signals measured during training at low cost (MoCo v3 paper, Sec. 4.1; recipe.md, "Instability").

The paper saw instability as dips of a dense kNN monitor, preceded by a spike of the per-layer gradient
magnitude that appears first in the patch projection and reaches the last layers some (up to tens of)
iterations later. This module watches, from its training step (``trainers.trainer.StepState``: after
backward with gradients unscaled, before the optimiser step):

- per-layer-group gradient norms (:func:`layer_groups`, :func:`grad_norms`), each judged against the median and
  robust spread of its own history (:class:`~trainers.detectors.SpikeDetector`), with spike events, spike
  "episodes" (which layer spiked first) and the lead in steps of the first layer's spike over the last block's;
- training-loss spikes (the same detector on the loss) and non-finite loss or gradients;
- representation collapse (:func:`collapse_std`, SimSiam's per-dimension std of L2-normalised outputs);
- significant dips of the dense kNN monitor and drops of the epoch kNN beyond their sampling noise
  (trainers/detectors.py: every detector at a stated false-alarm rate per epoch).

:class:`InstabilityMonitor` gathers them: every event is an :class:`Event` (step, epoch, kind, layer, magnitude)
and :meth:`InstabilityMonitor.epoch_summary` gives per-epoch numbers to report with the epoch metrics.

Cost: on a measured step, the per-tensor gradient norms come from one ``torch._foreach_norm``, the group norms,
the loss (and the losses of the unmeasured steps since the last measured one) and the collapse std are read back
in one ``.tolist()``: one device sync per measured step; unmeasured steps (``every > 1``) cost no sync at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.utils import unwrap_model
from torch import Tensor, nn

from trainers.detectors import Detectors, DipDetector, SpikeDetector  # noqa: F401  (re-exported)
from trainers.events import EVENT_KINDS, SUMMARY_KEYS, EpochSignals, Event  # noqa: F401  (re-exported)

# ------------------------------------------------------------------------------------------ layers and norms


def _trainable(*modules: nn.Module | None) -> list[nn.Parameter]:
    return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]


def layer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameter groups whose gradient norms are watched, in forward order, heads last.

    ``model`` is a method of ``trainers.methods`` (``.backbone``, ``.projector``, maybe ``.predictor``), possibly
    wrapped in DDP / torch.compile, or a bare backbone (no "heads" group then).

    ViT (has ``patch_embed``): "patch_embed" (the patch projection, or the whole conv stem), "first_block"
    (``blocks[0]``), "middle_block" (``blocks[depth // 2]``, depth >= 3), "last_block" (``blocks[-1]``, depth >= 2),
    "heads" (projector + predictor). A frozen patch projection (``stop_grad_conv1``) has no trainable parameter,
    so "patch_embed" is left out and "first_block" becomes the first group: the first layer that gets gradients.
    The class token, position embedding and final norm are in no group.
    ResNet (timm: ``conv1``, ``bn1``, ``layer1``..``layer4``): "stem" (conv1 + bn1), "layer1".."layer4" (whole
    stages), "heads".

    Only parameters with ``requires_grad``; groups are disjoint and empty groups are left out. The first group is
    the "first layer" of :class:`InstabilityMonitor`'s lead, the last one before "heads" its "last layer".
    """
    method = unwrap_model(model)
    backbone = getattr(method, "backbone", method)
    if hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks"):
        blocks = list(backbone.blocks)
        depth = len(blocks)
        candidates = [("patch_embed", [backbone.patch_embed]), ("first_block", blocks[:1])]
        if depth >= 3:
            candidates.append(("middle_block", [blocks[depth // 2]]))
        if depth >= 2:
            candidates.append(("last_block", [blocks[-1]]))
    elif all(hasattr(backbone, name) for name in ("conv1", "layer1", "layer2", "layer3", "layer4")):
        candidates = [("stem", [backbone.conv1, getattr(backbone, "bn1", None)])]
        candidates += [(f"layer{i}", [getattr(backbone, f"layer{i}")]) for i in range(1, 5)]
    else:
        raise ValueError(f"layer_groups knows ViT (patch_embed, blocks) and ResNet (conv1, layer1..4) backbones, "
                         f"not {type(backbone).__name__}")
    if backbone is not method:
        candidates.append(("heads", [getattr(method, "projector", None), getattr(method, "predictor", None)]))
    groups: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, modules in candidates:
        params = [p for p in _trainable(*modules) if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups[name] = params
    return groups


def grad_norm_tensor(groups: dict[str, list[nn.Parameter]]) -> tuple[list[str], Tensor | None]:
    """(names, float32 tensor of their gradient norms) without a device sync; groups without any gradient are left
    out (None when none has one). Each norm is the L2 norm of the group's concatenated gradients."""
    names, grads, sizes = [], [], []
    for name, params in groups.items():
        g = [p.grad for p in params if p.grad is not None]
        if g:
            names.append(name)
            grads += g
            sizes.append(len(g))
    if not grads:
        return [], None
    device = grads[0].device
    if all(g.device == device for g in grads) and not any(g.is_sparse for g in grads):
        per_tensor = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
    else:
        per_tensor = torch.stack([torch.linalg.vector_norm(g.float()).to(device) for g in grads])
    return names, torch.stack([torch.linalg.vector_norm(s) for s in per_tensor.split(sizes)])


def grad_norms(groups: dict[str, list[nn.Parameter]]) -> dict[str, float]:
    """L2 norm of the concatenated gradients of each group (one ``.tolist()``: one device sync); groups whose
    parameters have no gradient are left out."""
    names, norms = grad_norm_tensor(groups)
    return {} if norms is None else dict(zip(names, norms.tolist(), strict=True))


def collapse_std_tensor(features: Tensor) -> Tensor:
    """:func:`collapse_std` as a 0-d float32 tensor (no device sync)."""
    z = F.normalize(features.detach().float().flatten(1), dim=1)
    return z.std(dim=0).mean()


def collapse_std(features: Tensor) -> float:
    """SimSiam's collapse measure: the mean over dimensions of the per-dimension std of the L2-normalised
    features [B, d]. About 1/sqrt(d) for healthy (isotropic) outputs, towards 0 when they collapse to a point."""
    return collapse_std_tensor(features).item()


# ---------------------------------------------------------------------------------------------------- monitor


class InstabilityMonitor(Detectors):
    """The run's :class:`~trainers.detectors.Detectors`, fed from its training step; call :meth:`on_step` as a
    step hook (``trainers.trainer.StepState``: after backward with gradients unscaled, before the optimiser step).

    - Gradient norms of :func:`layer_groups` every ``every`` steps (steps with ``step % every == 0``): spikes.
    - The loss of every step, read back at the next measured step in the same sync: spikes and non-finite values.
    - Collapse every ``every`` steps from ``state.features`` (the backbone features the method returns), with
      ``collapse_threshold`` a fraction of the healthy 1/sqrt(d) (default 0.01). Backbone features carry a common
      component and read below 1/sqrt(d) even when healthy (a freshly initialised ViT's class tokens: about
      0.2-0.3 of it; MoCo v3 on Fashion-MNIST at a high learning rate, training well: 0.05 of it); a collapsed
      run is far below (identical outputs: 0; outputs within 1e-3 of one point: about 0.001 of it).
    - Non-finite and collapse events are emitted when the signal *enters* the bad state; the epoch summary's flags
      are set by any bad measurement of the epoch. Under fp16 the GradScaler's skipped steps show up as nonfinite.
    - :meth:`on_dense_knn` / :meth:`on_epoch_knn` (the Detectors'): significant dips.

    ``settings`` are :class:`~trainers.detectors.Detectors`' (``spike_tests`` defaults to the measured steps of
    ``steps_per_epoch``). In DDP every rank sees the same (all-reduced) gradients but its own loss and features;
    report rank 0's.
    """

    def __init__(self, every: int = 1, steps_per_epoch: int | None = None, **settings) -> None:
        if every < 1:
            raise ValueError(f"need every >= 1, got {every}")
        if steps_per_epoch:
            settings.setdefault("spike_tests", -(-steps_per_epoch // every))
        super().__init__(**settings)
        self.every = every
        self._model: nn.Module | None = None
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._pending: list[tuple[int, int, Tensor]] = []  # (step, epoch, loss) not read back yet

    def _measure(self, state=None) -> list[Event]:
        """Read back the pending losses (and, given ``state``, the gradient norms and collapse std) in one sync."""
        pending, self._pending = self._pending, []
        if not pending and state is None:
            return []
        names, norms, features = [], None, None
        if state is not None:
            model = unwrap_model(state.model)
            if model is not self._model:
                self._model, self._groups = model, layer_groups(model)
                self.groups = list(self._groups)
            names, norms = grad_norm_tensor(self._groups)
            features = state.features if state.features is not None and state.features.ndim >= 2 else None
        parts = [loss.reshape(1).float() for _, _, loss in pending]
        if norms is not None:
            parts.append(norms)
        if features is not None:
            parts.append(collapse_std_tensor(features).reshape(1))
        device = parts[0].device
        values = torch.cat([p.to(device) for p in parts]).tolist()
        new: list[Event] = []
        for (step, epoch, _), loss in zip(pending, values, strict=False):
            new += self.on_loss(step, epoch, loss)
        if state is not None:
            rest = values[len(pending):]
            new += self.on_grads(state.step, state.epoch, dict(zip(names, rest, strict=False)))
            if features is not None:
                new += self.on_collapse(state.step, state.epoch, rest[-1], features.flatten(1).shape[1])
        return new

    def on_step(self, state) -> list[Event]:
        """Step hook (``trainers.trainer.StepState``): returns the events found in this call (loss events of the
        unmeasured steps since the last measured one carry their own step)."""
        self._pending.append((state.step, state.epoch, state.loss.detach()))
        if state.step % self.every:
            return []
        return self._measure(state)

    __call__ = on_step

    @property
    def nonfinite_gradients(self) -> bool:
        """Whether a layer group's gradient norm was non-finite at the last measured step."""
        return self.nonfinite(self._groups)

    def flush(self) -> list[Event]:
        """Check the losses of unmeasured steps still pending (one sync); :meth:`epoch_summary` calls it."""
        return self._measure()

    def epoch_summary(self) -> dict[str, float]:
        """This epoch's :class:`EpochSignals` as a dict (``SUMMARY_KEYS``), then a reset; :meth:`flush` first."""
        self.flush()
        return super().epoch_summary()

    def state_dict(self) -> dict:
        """Everything but the model reference, as plain Python values (pending losses are checked first)."""
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pending = []
