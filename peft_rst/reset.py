"""The RST reset (Algorithm 1, Eq. 17) and the optimizer hook that applies it after every step.

Why a global optimizer post-step hook: the invariant "after each optimizer step every targeted entry within tau of
w0 equals w0" must hold in any training loop (plain PyTorch, `transformers.Trainer`, Accelerate with gradient
accumulation, where micro-batches do not step) without the user calling anything. torch runs global post-step hooks
once per real `optimizer.step()`; a skipped fp16 step (inf gradients) does not step and so does not reset. The hook
only touches the RST parameters that belong to the optimizer that stepped, so other optimizers are unaffected.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .resume import before_optimizer_step, is_state_init_step, not_stepping, record_reset_step

if TYPE_CHECKING:
    from .config import RSTConfig

# Elements processed per chunk: temporaries stay in cache, which makes the reset ~4x faster than one torch.where
# over the whole tensor and costs no extra memory proportional to the model.
_CHUNK = 1 << 16
# Tensors up to _CHUNK elements (biases, norms, small layers) are reset together, concatenated in batches of up to
# _BATCH elements: a handful of ops per batch instead of per tensor, so the per-tensor Python and kernel-launch cost
# does not grow with the number of wrapped modules.
_BATCH = 1 << 16


@dataclass
class ResetTarget:
    """One trainable copy W of a base parameter w0, as the reset needs it."""

    weight: torch.Tensor  # W
    base: torch.Tensor  # w0 (the base layer's parameter; never modified by training)
    is_bias: bool
    # where the layer holds W and w0 (`_parameters` dicts) under `name`: lets a cached plan check it is current
    weight_owner: dict | None = None
    base_owner: dict | None = None
    name: str = ""


class ResetGroup:
    """The reset state of one adapter of one model: its config, its layers and the step its schedules follow.

    Targets are resolved from the layers at every step rather than cached, because peft may replace adapter
    parameters after injection (dtype autocast, device moves, loading with `assign=True`).
    """

    def __init__(self, config: RSTConfig, adapter_name: str) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.layers: list = []  # RSTLayer instances holding this adapter
        self.step = 0
        self.plan = None  # a ResetPlan (peft_rst.reset_plan): built when first needed, rebuilt when stale

    def __getstate__(self) -> dict:
        # a copy (deepcopy, pickling) rebuilds its plan from its own tensors instead of copying the flat buffers
        return {**self.__dict__, "plan": None}

    def targets(self) -> list[ResetTarget]:
        found, seen = [], set()
        for layer in self.layers:
            for target in layer.reset_targets(self.adapter_name):
                if id(target.weight) not in seen:  # a tied weight is one W shared by two layers
                    seen.add(id(target.weight))
                    found.append(target)
        return found


_lock = threading.Lock()
# Weak, so that deleting a model needs no unregistration call.
_groups: weakref.WeakSet[ResetGroup] = weakref.WeakSet()
_hook_handle = None


def register(group: ResetGroup) -> None:
    """Make the global hook reset `group` whenever an optimizer holding its parameters steps."""
    global _hook_handle
    with _lock:
        _groups.add(group)
        if _hook_handle is None:
            # the pre-step hook adopts a reset step loaded with the optimizer state (peft_rst.resume)
            _hook_handle = (
                register_optimizer_step_pre_hook(before_optimizer_step),
                register_optimizer_step_post_hook(_after_optimizer_step),
            )


def unregister(group: ResetGroup) -> None:
    with _lock:
        _groups.discard(group)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    with _lock:
        groups = list(_groups)
    if not groups:
        return
    stepped = None
    # checkpoint state initialisation (zero grads, lr 0): no training step, so no reset and no count; the step is
    # still recorded, so the state it creates says where the schedule is
    counts = not is_state_init_step(optimizer)
    others = not_stepping(optimizer)
    for group in groups:
        if others and (id(group), id(group.plan)) in others:
            continue  # the pre-step hook found this optimizer holds none of the group's W
        stepped = held_ids(optimizer) if stepped is None else stepped
        plan = current_plan(group)
        if plan is not None and plan.weight_ids <= stepped:  # the usual case: the optimizer steps every W
            targets = plan.targets
            if not targets:
                continue
            if counts:
                group.step += 1
                if group.config.bias_only or group.config.keep_ratio is not None:
                    apply_reset(targets, group.config, group.step)
                else:
                    plan.reset(group.config.tau_at(group.step))
        elif plan is not None and plan.weight_ids.isdisjoint(stepped):
            continue  # another optimizer (another model's, a second optimizer): not this group's step
        else:
            targets = [t for t in group.targets() if id(t.weight) in stepped]
            if not targets:
                continue
            if counts:
                group.step += 1
                apply_reset(targets, group.config, group.step)
        record_reset_step(optimizer, group, targets)  # the step travels with optimizer.state_dict()


def held_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """The ids of the parameters `optimizer` holds (what its step can have changed)."""
    return {id(p) for param_group in optimizer.param_groups for p in param_group["params"]}


def current_plan(group: ResetGroup):
    """The group's `ResetPlan`, rebuilt if the model no longer holds the tensors it was built on; None if the
    targets cannot be checked cheaply (then they are resolved from the layers at every step)."""
    from .reset_plan import ResetPlan

    plan = group.plan
    if plan is not None and plan.valid(group.layers):
        return plan
    targets = group.targets()
    if any(t.weight_owner is None or t.base_owner is None for t in targets):
        group.plan = None
        return None
    group.plan = ResetPlan(group.layers, targets)
    return group.plan


# Integer dtypes of each float width: the reset selects bit patterns with integer ops, because torch.where with a
# bool mask and bool-valued comparisons run several times slower on CPU than arithmetic over the same elements.
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _reset_flat_(w: torch.Tensor, b: torch.Tensor, tau: float) -> None:
    """In place on 1-D contiguous `w`: w[i] = b[i] wherever |w[i] - b[i]| <= tau, `b` already in `w`'s dtype.

    Bit for bit `torch.where(|w - b| <= tau, b, w, out=w)` (NaN differences keep w), as w ^= (w ^ b) & mask.
    """
    bits = _BITS.get(w.element_size()) if w.dtype.is_floating_point else None
    if bits is None or isinstance(w, DTensor):  # a DTensor whose shards are not aligned with w0's: no bit views
        torch.where((w - b).abs_() <= tau, b, w, out=w)
        return
    mask = (w - b).abs_().le_(tau).to(bits).neg_()  # all ones where the entry goes back to w0
    w_bits = w.view(bits)
    flips = torch.bitwise_xor(w_bits, b.view(bits)).bitwise_and_(mask)
    w_bits.bitwise_xor_(flips)


@torch.no_grad()
def reset_below_threshold_(weight: torch.Tensor, base: torch.Tensor, tau: float) -> None:
    """In place: weight[i] = base[i] wherever |weight[i] - base[i]| <= tau (bitwise copy of base)."""
    flat_w = weight.view(-1)
    flat_b = base.view(-1)
    same_dtype = flat_b.dtype == flat_w.dtype
    for start in range(0, flat_w.numel(), _CHUNK):
        w = flat_w[start : start + _CHUNK]
        b = flat_b[start : start + _CHUNK]
        if not same_dtype:
            b = b.to(w.dtype)
        _reset_flat_(w, b, tau)


def _local_pair(weight: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The local shards of a sharded (FSDP2 DTensor) W and w0 laid out alike; the tensors themselves otherwise.

    W and w0 have the same shape, so equal placements on the same mesh make the local shards entry-aligned, and the
    elementwise reset on them is the reset of the whole tensor.
    """
    if isinstance(weight, DTensor) and isinstance(base, DTensor):
        if weight.placements == base.placements and weight.device_mesh == base.device_mesh:
            return weight.to_local(), base.to_local()
    return weight, base


@torch.no_grad()
def _reset_batch_(weights: list[torch.Tensor], bases: list[torch.Tensor], tau: float) -> None:
    """`reset_below_threshold_` for several small tensors of one dtype and device, with one op of each kind.

    The flatten / unflatten helpers (those of DDP's bucketing) concatenate and split in C++, without a Python view
    per tensor.
    """
    flat_w = _flatten_dense_tensors(weights)
    flat_b = _flatten_dense_tensors(bases).to(flat_w.dtype)
    _reset_flat_(flat_w, flat_b, tau)
    torch._foreach_copy_(weights, _unflatten_dense_tensors(flat_w, weights))


@torch.no_grad()
def reset_all_below_threshold_(targets: list[ResetTarget], tau: float) -> None:
    """`reset_below_threshold_` on every target: large tensors chunk by chunk, small ones batched together."""
    batches: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], list[int]]] = {}
    for t in targets:
        w, b = t.weight, t.base
        if isinstance(w, DTensor):
            w, b = _local_pair(w, b)
        n = w.numel()
        if n > _CHUNK or isinstance(w, DTensor):  # a sharded pair whose shards are not entry-aligned stays whole
            reset_below_threshold_(w, b, tau)
            continue
        if not n:
            continue
        key = (w.dtype, b.dtype, w.device)
        batch = batches.get(key)
        if batch is None:
            batch = batches[key] = ([], [], [0])
        batch[0].append(w)
        batch[1].append(b)
        batch[2][0] += n
        if batch[2][0] >= _BATCH:
            _reset_batch_(batch[0], batch[1], tau)
            del batches[key]
    for ws, bs, _ in batches.values():
        _reset_batch_(ws, bs, tau)


def _changes(weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|W - w0| flattened, in float32: what the top-r mode ranks."""
    return (weight - base.to(weight.dtype)).abs().reshape(-1).float()


def _whole(weight: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W and w0 as whole plain tensors (DTensors gathered: the layout-independent fallback of the ranking)."""
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if isinstance(base, DTensor):
        base = base.full_tensor()
    return weight, base


def _shard_layout(targets: list[ResetTarget]) -> tuple[dist.ProcessGroup, int] | None:
    """For targets whose W and w0 are DTensors sharded alike along one mesh dimension of one mesh (FSDP2, HSDP): the
    process group of that mesh dimension and a bound on any rank's number of local entries; None otherwise.

    Then each rank's local shards are disjoint pieces of the whole and the ranks of that group hold all of it, so a
    ranking over the union of their local candidates is a ranking over the whole adapter.
    """
    mesh, mesh_dim, bound = None, None, 0
    for t in targets:
        w, b = t.weight, t.base
        if not (isinstance(w, DTensor) and isinstance(b, DTensor)):
            return None
        if w.device_mesh != b.device_mesh or w.placements != b.placements:
            return None
        shards = [i for i, p in enumerate(w.placements) if type(p) is Shard]
        if len(shards) != 1 or not all(type(p) in (Shard, Replicate) for p in w.placements):
            return None
        if mesh is None:
            mesh, mesh_dim = w.device_mesh, shards[0]
        elif (w.device_mesh, shards[0]) != (mesh, mesh_dim):
            return None
        rows = w.shape[w.placements[mesh_dim].dim]
        if rows:  # torch.chunk (FSDP2's split) gives each rank at most ceil(rows / ranks) rows
            bound += -(-rows // mesh.size(mesh_dim)) * (w.numel() // rows)
    if mesh is None:
        return None
    return mesh.get_group(mesh_dim), bound


def _kth_largest_change(targets: list[ResetTarget], keep: int) -> float:
    """The `keep`-th largest |W - w0| over all entries of `targets` (0 < keep < their count), the same on every rank.

    Sharded W (FSDP2): every rank takes the `keep` largest of its local entries, the ranks all-gather them and take the
    `keep`-th largest of the union. The whole adapter's `keep` largest values are in that union, so this is the exact
    global value (ties and NaN included, as `torch.topk` orders them), with one collective per step and memory
    O(min(keep, local entries) x ranks) instead of gathering every tensor.
    """
    layout = _shard_layout(targets)
    if layout is None:
        # plain tensors, or DTensors laid out otherwise: rank the whole tensors (a DTensor is gathered in full)
        magnitudes = torch.cat([_changes(*_whole(t.weight, t.base)) for t in targets])
        return torch.topk(magnitudes, keep, largest=True, sorted=False).values.min().item()
    group, bound = layout
    local = torch.cat([_changes(*_local_pair(t.weight, t.base)) for t in targets])
    top = torch.topk(local, min(keep, local.numel()), largest=True, sorted=False).values
    candidates = torch.full((min(keep, bound),), float("-inf"), device=local.device)  # equal sizes for all_gather
    candidates[: top.numel()] = top
    gathered = [torch.empty_like(candidates) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, candidates, group=group)
    return torch.topk(torch.cat(gathered), keep, largest=True, sorted=False).values.min().item()


@torch.no_grad()
def _keep_top_fraction_(targets: list[ResetTarget], fraction: float) -> None:
    """Keep the `fraction` of entries with the largest |W - w0| over all targets; reset the others to w0.

    The ranking is over the whole adapter also when W is sharded (FSDP2): see `_kth_largest_change`.
    """
    total = sum(t.weight.numel() for t in targets)  # a DTensor's numel is the whole tensor's
    keep = int(round(fraction * total))
    if keep >= total:
        return
    if keep <= 0:
        for t in targets:
            w, b = _local_pair(t.weight, t.base)
            w.copy_(b)
        return
    # k-th largest change; entries at or below it (but for ties at the threshold itself) are reset.
    threshold = _kth_largest_change(targets, keep)
    for t in targets:
        w, b = _local_pair(t.weight, t.base)
        b = b.to(w.dtype)
        torch.where((w - b).abs() < threshold, b, w, out=w)


@torch.no_grad()
def apply_reset(targets: list[ResetTarget], config: RSTConfig, step: int) -> None:
    """Apply the reset rule of `config` after optimizer step `step` (1-based) to `targets`."""
    if config.bias_only:
        for t in targets:
            if not t.is_bias:
                t.weight.copy_(t.base)
        return
    if config.keep_ratio is not None:
        _keep_top_fraction_(targets, config.keep_ratio_at(step))
        return
    reset_all_below_threshold_(targets, config.tau_at(step))
