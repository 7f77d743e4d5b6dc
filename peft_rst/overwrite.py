"""Write entries into base parameters and write back what they replaced: the one mechanism behind patching and merging.

An inference adapter is activated by writing its changed entries into the base parameters; merging writes an
adapter's entries for good. Both must undo bit-exactly, so both keep the values they overwrite, at the same
positions, and copy them back. The cost is O(written entries): one gather and one scatter per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.autograd.graph import increment_version

# (parameter name, flat positions (int64, or int32 where they fit), values that were there before the write)
Saved = list[tuple[str, torch.Tensor, torch.Tensor]]


def _scatter_takes_int32() -> bool:
    """Whether this torch's `scatter_` / `index_select` index with int32 positions (recent versions do)."""
    try:
        torch.zeros(2).scatter_(0, torch.ones(1, dtype=torch.int32), torch.ones(1))
    except RuntimeError:
        return False
    return True


_INT32_OK = _scatter_takes_int32()


def _index(positions: torch.Tensor) -> torch.Tensor:
    return positions if _INT32_OK or positions.dtype == torch.int64 else positions.long()


def write_entries(
    params: dict[str, torch.Tensor],
    updates: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    *,
    visible: bool,
) -> Saved:
    """Write `values` at flat `positions` (int64 or int32) of each named parameter; return what they replaced.

    `visible=False` (inference patches) writes through `.data` and leaves the tensors' versions alone, so that
    fingerprints cached for w0 stay valid while a patch is in; `visible=True` (merging) bumps the version, because the
    base then differs from w0 for good.
    """
    saved: Saved = []
    for name, positions, values in updates:
        param = params[name]
        flat = param.data.view(-1)
        positions = _index(positions)
        saved.append((name, positions, flat.index_select(0, positions)))
        flat.scatter_(0, positions, values if values.dtype == flat.dtype else values.to(flat.dtype))
        if visible:
            increment_version(param)
    return saved


def write_back(params: dict[str, torch.Tensor], saved: Saved, *, visible: bool) -> None:
    """Undo `write_entries` bit-exactly, also after the model was moved or cast (`.to()`, `.half()`)."""
    for name, positions, previous in reversed(saved):
        param = params[name]
        flat = param.data.view(-1)
        if previous.dtype != flat.dtype or previous.device != flat.device:
            positions, previous = positions.to(flat.device), previous.to(device=flat.device, dtype=flat.dtype)
        flat.scatter_(0, _index(positions), previous)
        if visible:
            increment_version(param)


def original_values(saved_stack: Iterable[Saved], name: str, current: torch.Tensor) -> torch.Tensor:
    """Flat copy of parameter `name` as it was before every write in `saved_stack` (oldest first) was made."""
    flat = current.detach().reshape(-1).clone()
    for saved in reversed(list(saved_stack)):
        for param_name, positions, previous in saved:
            if param_name == name:
                flat.scatter_(0, _index(positions.to(flat.device)), previous.to(device=flat.device, dtype=flat.dtype))
    return flat
