"""Shared helpers of the peft_rst tests: tiny models, name mapping and Algorithm 1 written out by hand.

The helpers are reached through the `rst_tools` fixture (this module itself), so that test modules never import a
module called `conftest` (other test folders may have their own).
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable, Iterable

import pytest
import torch
from torch import nn

import peft_rst  # noqa: F401  (registers RST with peft)


@pytest.fixture(scope="session")
def rst_tools():
    """This module: `rst_tools.ManualRST`, `rst_tools.adapter_weights`, ..."""
    return sys.modules[__name__]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------- names
_ADAPTER_SEGMENT = re.compile(r"\.rst_weight\.[^.]+(?=\.)")


def original_name(peft_name: str) -> str:
    """`base_model.model.a.base_layer.b.rst_weight.default.weight` -> `a.b.weight` (the name before wrapping)."""
    name = peft_name.removeprefix("base_model.model.")
    name = _ADAPTER_SEGMENT.sub("", name)
    name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
    return name.removeprefix("base_layer.")


def adapter_weights(peft_model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """W of every RST-targeted parameter of `adapter`, keyed by the parameter's name in the unwrapped model."""
    marker = f".rst_weight.{adapter}."
    return {original_name(n): p for n, p in peft_model.named_parameters(remove_duplicate=False) if marker in n}


def base_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The wrapped model's own parameters (w0 for targeted ones), keyed by their names before wrapping."""
    return {
        original_name(n): p
        for n, p in peft_model.named_parameters(remove_duplicate=False)
        if ".rst_weight." not in n and ".modules_to_save." not in n
    }


def saved_module_weights(peft_model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Trainable copies of `modules_to_save`, keyed by the original names."""
    marker = f".modules_to_save.{adapter}."
    return {original_name(n.replace(marker, ".")): p for n, p in peft_model.named_parameters() if marker in n}


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in tensors.items()}


# ------------------------------------------------------------------------------------------ Algorithm 1 by hand
class ManualRST:
    """Full fine-tuning of a plain model plus the reset of Algorithm 1, written independently of peft_rst.

    `w0` is a deep copy taken at construction; `reset()` does `w = where(|w - w0| <= tau, w0, w)` on every parameter
    whose name passes `targeted` (all by default).
    """

    def __init__(self, model: nn.Module, tau: float, targeted: Callable[[str], bool] = lambda name: True) -> None:
        self.model = model
        self.tau = tau
        self.targeted = targeted
        self.w0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def reset(self) -> None:
        for name, p in self.model.named_parameters():
            if self.targeted(name):
                w0 = self.w0[name]
                p.copy_(torch.where((p - w0).abs() <= self.tau, w0, p))


def assert_matches_reference(peft_model: nn.Module, reference: nn.Module, adapter: str = "default") -> int:
    """Every parameter of the RST model (W, or the dense head copy) equals the reference's bit for bit.

    Also compares the non-zero counts of w - w0. Returns the total number of changed entries.
    """
    weights = {**adapter_weights(peft_model, adapter), **saved_module_weights(peft_model, adapter)}
    bases = base_weights(peft_model)
    ref_params = dict(reference.named_parameters())
    assert set(weights) == set(ref_params), sorted(set(weights) ^ set(ref_params))
    changed = 0
    for name, ref in ref_params.items():
        w = weights[name]
        assert torch.equal(w, ref), f"{name}: max |diff| {(w.double() - ref.double()).abs().max().item()}"
        nnz = (w - bases[name]).count_nonzero().item()
        assert nnz == (ref - bases[name]).count_nonzero().item(), name
        changed += nnz
    return changed


def assert_reset_invariant(peft_model: nn.Module, tau: float, adapter: str = "default") -> None:
    """After a step: every entry with |W - w0| <= tau equals w0 exactly (bitwise)."""
    bases = base_weights(peft_model)
    for name, w in adapter_weights(peft_model, adapter).items():
        w0 = bases[name].to(w.dtype)
        near = (w.detach() - w0).abs() <= tau
        # bitwise, not numerically: -0.0 == 0.0 would pass a float comparison
        bad = near & (_bits(w.detach()) != _bits(w0))
        assert not bad.any(), f"{name}: {int(bad.sum())} entries within tau of w0 were not reset"


_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_INT_VIEW[torch.float64] = torch.int64


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (torch.equal treats -0.0 and 0.0 as equal and NaN as unequal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def batches(n: int, make: Callable[[torch.Generator], tuple], seed: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [make(g) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------- tiny models
class Scale(nn.Module):
    """A module owning a bare parameter and a child, like CLIP's vision embeddings (`class_embedding`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x + self.class_embedding)


class MixedNet(nn.Module):
    """Every module kind RST must cover: Embedding, Conv1d, Conv2d, LayerNorm, BatchNorm, Conv1D, bare parameter."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.bn = nn.BatchNorm1d(16)
        self.gpt_conv = Conv1D(8, 16)  # transformers' GPT-2 layer: weight (in, out)
        self.scale = Scale(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).transpose(1, 2)  # (B, 8, L)
        h = torch.tanh(self.conv1(h))
        h = self.conv2(h.unsqueeze(1)).flatten(1, 2).mean(-1)  # (B, 16)
        h = self.bn(self.norm(h))
        h = torch.tanh(self.gpt_conv(h))
        return self.head(self.scale(h))


def mixed_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 12, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 16, d_out: int = 3) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.lin1 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.lin0(x)))
        return self.head(torch.tanh(self.lin1(h)))


def mlp_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterable[tuple],
    after_step: Callable[[], None] | None = None,
) -> None:
    """Plain PyTorch loop: cross-entropy on (inputs, labels) batches, one optimizer step per batch."""
    model.train()
    for inputs, labels in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        if after_step is not None:
            after_step()


def twin(model: nn.Module) -> nn.Module:
    """An independent deep copy (the reference model of the manual Algorithm 1)."""
    return copy.deepcopy(model)
