"""The reset of one adapter as a plan kept between optimizer steps: W laid out in one flat buffer, chunks precomputed.

Why: the reset runs after every optimizer step over every W of the model. Resolving the targets layer by layer and
concatenating W and w0 into temporary buffers (then copying W back) costs more than the reset arithmetic itself on
models with many small layers. The plan resolves the targets once and moves every W (same values, same parameter
objects) into one flat CPU buffer per dtype, each W keeping a storage of its own (see `_contiguous_storages`), so the
reset works on W in place, chunk by chunk, with no copy of W; w0 of a chunk of small tensors is gathered into one
reusable scratch buffer. Before every step it checks, without walking the layers' modules, that the model still holds
the same tensors (peft or the user may replace W or w0 between steps: dtype casts, `.to()`,
`load_state_dict(assign=True)`); if anything changed, the plan is rebuilt.

Only plain CPU tensors that own their whole storage are moved: views of someone else's buffer (FSDP1 flat
parameters), sharded DTensors (FSDP2) and accelerator tensors keep their storage and are reset as before.
"""

from __future__ import annotations

import operator
import weakref

import numpy
import torch
from torch.distributed.tensor import DTensor

from .reset import _CHUNK, ResetTarget, _reset_flat_, reset_all_below_threshold_

# Elements per chunk of the plan's reset, and per batch of small tensors (those of up to `_CHUNK` elements, whose
# w0 are gathered), for each torch thread: seven whole-chunk ops each, with work buffers and scratch of this size made
# once per plan. Each thread's share of a chunk's four arrays (W, w0, two work buffers) then fits in a core's L2
# cache, so the seven passes over a chunk after the first read cache, not memory; larger chunks dispatch fewer ops
# but spill. Capped so that the buffers stay a few MB with many threads.
_PLAN_CHUNK_PER_THREAD = 1 << 16
_PLAN_CHUNK_MAX = 1 << 20


def plan_chunk() -> int:
    """Elements per chunk of a plan built now: `_PLAN_CHUNK_PER_THREAD` per torch intra-op thread, capped."""
    return min(_PLAN_CHUNK_PER_THREAD * max(1, torch.get_num_threads()), _PLAN_CHUNK_MAX)


def _contiguous_storages(sizes: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One flat CPU tensor, and 1-D tensors of `sizes` elements laid out back to back in it, each its own storage.

    Separate storages matter: `safetensors` (and Accelerate's `save_state`, `save_pretrained`) refuse or drop
    tensors that share a storage, so W must not be views of one tensor. Storages made by `torch.from_numpy` over
    slices of one numpy buffer alias that buffer without sharing a storage object; the buffer lives as long as any
    of them.
    """
    element = torch.empty(0, dtype=dtype).element_size()
    buffer = numpy.empty(sum(sizes) * element, dtype=numpy.uint8)
    _BUFFERS[buffer.ctypes.data] = buffer  # a later plan over the same tensors finds them laid out (`_tiled`)
    pieces, start = [], 0
    for n in sizes:
        pieces.append(torch.from_numpy(buffer[start : start + n * element]).view(dtype))
        start += n * element
    return torch.from_numpy(buffer).view(dtype), pieces


# start address -> numpy buffer of tensors laid out back to back (by a `FlatAllocator` or `_contiguous_storages`);
# weak: the buffer lives as long as any tensor in it
_BUFFERS: weakref.WeakValueDictionary[int, numpy.ndarray] = weakref.WeakValueDictionary()


def _allocatable(base: torch.Tensor) -> bool:
    """Whether W of `base` can be made in a flat buffer (and then be reset in place by a plan)."""
    if isinstance(base, DTensor) or base.device.type != "cpu" or not base.dtype.is_floating_point:
        return False
    return base.numel() > 0 and not base.is_shared()


class FlatAllocator:
    """Makes the W of one injection back to back in one flat CPU buffer per dtype, each W a storage of its own.

    Why: a `ResetPlan` resets W in place only when every W lies in one flat buffer. Copying W there after they were
    made frees their first storages, which glibc keeps (the process's RSS stays one copy of W higher, also after
    the model is dropped); making them there from the start needs no copy. `sizes` is the total per dtype of the
    base parameters to be copied; the buffer's untouched pages cost no memory.
    """

    def __init__(self, sizes: dict[torch.dtype, int]) -> None:
        self._free: dict[torch.dtype, tuple[numpy.ndarray, int]] = {}
        for dtype, n in sizes.items():
            if n:
                buffer = numpy.empty(n * torch.empty(0, dtype=dtype).element_size(), dtype=numpy.uint8)
                _BUFFERS[buffer.ctypes.data] = buffer
                self._free[dtype] = (buffer, 0)

    def take(self, base: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised tensor like `base` in the buffer of its dtype, or None if it has no room for it."""
        free = self._free.get(base.dtype)
        if free is None or not _allocatable(base):
            return None
        buffer, start = free
        end = start + base.numel() * base.element_size()
        if end > buffer.nbytes:
            return None
        self._free[base.dtype] = (buffer, end)
        return torch.from_numpy(buffer[start:end]).view(base.dtype).view(base.shape)


def _tiled(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
    """The flat buffer that `tensors` (in this order) tile from its start without gaps, if there is one."""
    buffer = _BUFFERS.get(tensors[0].data_ptr())
    if buffer is None:
        return None
    ptr = buffer.ctypes.data
    for t in tensors:
        if t.data_ptr() != ptr:
            return None
        ptr += t.numel() * t.element_size()
    used = ptr - buffer.ctypes.data
    return torch.from_numpy(buffer[:used]).view(dtype)


def _preallocated(targets: list[ResetTarget], dtype: torch.dtype) -> torch.Tensor | None:
    """The flat buffer that `targets`' W (in address order) tile from its start without gaps, if there is one."""
    return _tiled([t.weight for t in targets], dtype)


def _alone_in_storage(base: torch.Tensor) -> bool:
    """Whether `base` is a plain contiguous CPU float tensor that owns its whole storage and shares it with no other
    tensor: moving it then unties nothing (two parameters made over one storage would stop sharing their values).
    Decided by the storage's reference count (torch's private `_storage_Use_Count`); without it, nothing moves."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or not _allocatable(base) or not base.is_contiguous() or base.storage_offset() != 0:
        return False
    storage = base.untyped_storage()
    if storage.nbytes() != base.numel() * base.element_size():
        return False
    return use_count(storage._cdata) == 2  # held by `base` and by `storage` here


def _flat_bases(bases: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
    """`bases` (w0) back to back in one flat buffer in this order, each a storage of its own, as one flat tensor.

    Why: w0 of small tensors would otherwise be gathered into a scratch buffer on every step, a copy that costs a
    third of the reset once forward and backward have pushed w0 out of the caches. Moved once (same values, same
    parameter objects; `base.data` is repointed, as `switch_plan` does); a later plan finds them laid out. None if
    any cannot be moved (then they are gathered).
    """
    flat = _tiled(bases, dtype)
    if flat is not None:
        return flat
    if len({id(b) for b in bases}) != len(bases) or not all(map(_alone_in_storage, bases)):
        return None
    flat, pieces = _contiguous_storages([b.numel() for b in bases], dtype)
    for base, piece in zip(bases, pieces, strict=True):
        piece.copy_(base.detach().reshape(-1))
        base.data = piece.view(base.shape)
    return flat


def packs_in_place(targets: list[ResetTarget]) -> bool:
    """Whether a plan built on `targets` would find every W it packs laid out in a flat buffer already (no move)."""
    by_dtype: dict[torch.dtype, list[ResetTarget]] = {}
    for t in targets:
        if _packable(t):
            by_dtype.setdefault(t.weight.dtype, []).append(t)
    return all(
        _preallocated(sorted(group, key=lambda t: t.weight.data_ptr()), dtype) is not None
        for dtype, group in by_dtype.items()
    )


def _packable(target: ResetTarget) -> bool:
    w, b = target.weight, target.base
    if isinstance(w, DTensor) or isinstance(b, DTensor) or w.dtype != b.dtype or w.device != b.device:
        return False
    if w.device.type != "cpu":  # the separate storages over one buffer are made through numpy
        return False
    if not (w.is_contiguous() and b.is_contiguous()) or w.numel() == 0 or not w.dtype.is_floating_point:
        return False
    if w.is_shared():  # moved to shared memory (Hogwild training): moving it out would end the sharing
        return False
    # W must own its storage: repointing a view of a buffer owned by a wrapper (FSDP1) would detach it from it
    return w.storage_offset() == 0 and w.untyped_storage().nbytes() == w.numel() * w.element_size()


# Float dtypes whose reset compares |W - w0| with tau as integers (see `_reset_bits_`), and their widths.
_BITS_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def _tau_bits(tau: float, dtype: torch.dtype, bits: torch.dtype) -> torch.Tensor:
    """tau rounded to `dtype`, as a 0-dim tensor of the signed integer of its bit pattern (-0.0 as 0.0: its bit
    pattern, read as an integer, is the most negative one, yet |d| <= -0.0 holds where d is zero)."""
    return torch.tensor(tau + 0.0, dtype=dtype).view(bits)


def _reset_bits_(w, w_bits, b, b_bits, d, d_bits, tau_bits: torch.Tensor) -> None:
    """`reset._reset_flat_` for float32 / float64 and tau >= 0, in the work buffer `d` (no allocation).

    `*_bits` are the same memory viewed as integers, made beforehand: a plan calls this for every chunk after every
    optimizer step, so nothing here makes a view or a Python object. For non-negative floats (and NaN, whose bit
    pattern exceeds every number's), the IEEE bit patterns read as signed integers are ordered like the values, so
    W is kept where bits(tau) - bits(|d|) < 0, and an arithmetic shift by the width - 1 turns that sign into the
    all-ones mask of the entries kept. W ^ w0, masked, ^ w0 is then W where kept and w0 elsewhere: the mask is
    applied to W in place, with no second buffer. `tau_bits` is tau rounded to W's dtype (`_tau_bits`) as torch
    rounds a scalar compared with a tensor; `abs_` clears the sign bit of NaN too.
    """
    torch.sub(w, b, out=d)
    d.abs_()
    torch.sub(tau_bits, d_bits, out=d_bits)
    d_bits.bitwise_right_shift_(w.element_size() * 8 - 1)
    w_bits.bitwise_xor_(b_bits)
    w_bits.bitwise_and_(d_bits)
    w_bits.bitwise_xor_(b_bits)


_MERGED = operator.attrgetter("merged_adapters")
_PATCHED = operator.attrgetter("_patched")


class ResetPlan:
    """The targets of one `ResetGroup`, resolved once, with W packed flat for a chunked reset in place."""

    def __init__(self, layers: list, targets: list[ResetTarget]) -> None:
        self.layers = layers
        self.targets = targets
        self.weight_ids = frozenset(id(t.weight) for t in targets)
        packable: dict[tuple, list[ResetTarget]] = {}
        self.rest: list[ResetTarget] = []  # reset through the generic path every step
        for t in targets:
            if _packable(t):
                packable.setdefault(t.weight.dtype, []).append(t)
            else:
                self.rest.append(t)
        # per chunk: (W's flat view, w0's flat view) or (W's flat view, [w0 flat views to gather], scratch)
        self.chunks: list[tuple[torch.Tensor, torch.Tensor | list[torch.Tensor], torch.Tensor | None]] = []
        for dtype, group in packable.items():
            self._pack(group, dtype)
        # what the reset runs on per chunk, with its work buffers, and the integer dtype per float dtype: made at
        # the first reset (`_prepare_steps`)
        self.steps: list[tuple] | None = None
        self.widths: dict[torch.dtype, torch.dtype] = {}
        self._tau_bits: tuple[float, dict[torch.dtype, torch.Tensor]] = (float("nan"), {})  # tau, and its bits
        # where every tensor of the plan is held, and where its data was: the check before every step
        held = [(t.weight_owner, t.name, t.weight) for t in targets] + [
            (t.base_owner, t.name, t.base) for t in targets
        ]
        self.checks = (
            [owner for owner, _, _ in held],
            [name for _, name, _ in held],
            [tensor for _, _, tensor in held],
            [tensor.data_ptr() for _, _, tensor in held],
        )

    @torch.no_grad()
    def _pack(self, targets: list[ResetTarget], dtype: torch.dtype) -> None:
        targets = sorted(targets, key=lambda t: t.weight.data_ptr())
        flat = _preallocated(targets, dtype)
        if flat is None:  # W made elsewhere: move them into a new buffer
            flat, pieces = _contiguous_storages([t.weight.numel() for t in targets], dtype)
        else:
            pieces = [t.weight.detach().view(-1) for t in targets]
        first = len(self.chunks)
        chunk = plan_chunk()
        # w0 of the small tensors (batched) laid out in W's order: a batch reads them in place, no gather
        small_bases = [t.base for t in targets if t.weight.numel() <= _CHUNK]
        flat_b = _flat_bases(small_bases, dtype) if small_bases else None
        scratch = None
        batch_b: list[torch.Tensor] = []
        batch_start = offset = b_offset = 0

        def close_batch() -> None:
            nonlocal scratch, batch_b, b_offset
            n = offset - batch_start
            if n and flat_b is not None:
                self.chunks.append((flat[batch_start : batch_start + n], flat_b[b_offset : b_offset + n], None))
                b_offset += n
            elif n:
                if scratch is None or scratch.numel() < n:
                    scratch = torch.empty(n, dtype=dtype)
                self.chunks.append((flat[batch_start : batch_start + n], list(batch_b), scratch))
            batch_b = []

        for t, piece in zip(targets, pieces, strict=True):
            w, n = t.weight, t.weight.numel()
            if piece.data_ptr() != w.data_ptr():
                piece.copy_(w.detach().reshape(-1))
                w.data = piece.view(w.shape)
            view = flat[offset : offset + n]
            b = t.base.detach().view(-1)
            if n > _CHUNK:
                close_batch()
                for start in range(0, n, chunk):
                    self.chunks.append((view[start : start + chunk], b[start : start + chunk], None))
                offset += n
                batch_start = offset
                continue
            if offset - batch_start + n > chunk:  # a batch stays within one chunk
                close_batch()
                batch_start = offset
            batch_b.append(b)
            offset += n
        close_batch()
        # this dtype's batches share one scratch buffer (the largest batch's)
        self.chunks[first:] = [(w, b, scratch if s is not None else None) for w, b, s in self.chunks[first:]]

    def valid(self, layers: list) -> bool:
        """Whether the model still holds exactly the tensors (and storages) this plan was built on."""
        if layers is not self.layers:
            return False
        # as C-level maps over the columns: this runs around every optimizer step, once per layer, target and tensor
        if any(map(_MERGED, layers)) or list(map(_PATCHED, layers)).count(None) != len(layers):
            return False  # an inference adapter is written into w0, or an adapter is merged
        owners, names, tensors, pointers = self.checks
        if not all(map(operator.is_, map(dict.get, owners, names), tensors)):
            return False
        return list(map(torch.Tensor.data_ptr, tensors)) == pointers

    @torch.no_grad()
    def reset(self, tau: float) -> None:
        """`reset_all_below_threshold_` on every target, bit for bit."""
        if self.steps is None:
            self.steps = self._prepare_steps()
        fast = tau >= 0  # False for NaN too
        if fast and self._tau_bits[0] != tau:  # tau changes only with a schedule
            self._tau_bits = (tau, {dtype: _tau_bits(tau, dtype, bits) for dtype, bits in self.widths.items()})
        tau_bits = self._tau_bits[1]
        for w, b, gathered, views in self.steps:
            if gathered is not None:
                torch.cat(b, out=gathered)
                b = gathered
            if views is None or not fast:
                _reset_flat_(w, b, tau)
                continue
            w_bits, b_bits, d, d_bits = views
            _reset_bits_(w, w_bits, b, b_bits, d, d_bits, tau_bits[w.dtype])
        if self.rest:
            reset_all_below_threshold_(self.rest, tau)

    def _prepare_steps(self) -> list[tuple]:
        """Per chunk: W, w0 (or the w0 pieces to gather and where), and the integer views and work buffers the
        bitwise reset needs. Made at the first reset, so a plan that never resets (inference) holds no buffers."""
        work: dict[torch.dtype, torch.Tensor] = {}
        for dtype, bits in _BITS_OF.items():
            sizes = [w.numel() for w, _, _ in self.chunks if w.dtype == dtype]
            if sizes:
                work[dtype] = torch.empty(max(sizes), dtype=dtype)
                self.widths[dtype] = bits
        steps = []
        for w, b, scratch in self.chunks:
            n = w.numel()
            gathered = scratch[:n] if scratch is not None else None
            views = None
            if w.dtype in work:
                bits = self.widths[w.dtype]
                d = work[w.dtype][:n]
                b_flat = gathered if gathered is not None else b
                views = (w.view(bits), b_flat.view(bits), d, d.view(bits))
            steps.append((w, b, gathered, views))
        return steps
