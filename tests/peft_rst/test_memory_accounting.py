"""RST's training state is exactly what docs/rst.md accounts for: w0 + W + gradient + optimizer state.

Bytes of the distinct storages of parameters, gradients and optimizer state after one step, against P targeted
parameters of 4 bytes: full fine-tuning 3P (SGD momentum) / 4P (AdamW), RST one P more (w0). A hidden copy (a
second w0, a backup of the patched base, a dense delta) would show as more. benchmarks/rst_memory.py runs the same
check for each rank of a 2-process FSDP2 run and prints the towers' figures.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from peft import get_peft_model
from tiny_vision import tiny_clip_vision_config
from transformers import CLIPVisionModelWithProjection

import peft_rst


def _held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for t in [*model.parameters(), *grads, *state]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@pytest.mark.parametrize("optimizer_name,states", [("sgd", 1), ("adamw", 2)])
@pytest.mark.parametrize("rst", [False, True])
def test_state_after_a_step_is_the_accounted_multiple_of_the_weights(optimizer_name, states, rst):
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(tiny_clip_vision_config())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if rst:
        model = get_peft_model(model, peft_rst.RSTConfig(tau=1e-6))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        if optimizer_name == "sgd"
        else torch.optim.AdamW(params, lr=1e-4)
    )
    model(pixel_values=torch.randn(2, 3, 16, 16)).image_embeds.sum().backward()
    optimizer.step()
    assert _held_bytes(model, optimizer) == weights * (2 + states + int(rst))


def test_w_and_w0_replaced_by_their_shards_are_freed_at_once():
    """FSDP2's `fully_shard` puts each parameter's shard in its place (`module._parameters[name] = shard`). Nothing
    in RST may keep the original W or w0 alive after that, or every rank holds them next to its shards: the
    injection's tied-weight map kept every W for the model's lifetime, and a reset plan built at injection kept W
    and w0 until the first optimizer step rebuilt it."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model = get_peft_model(body, peft_rst.RSTConfig(tau=1e-3))
    originals = []
    for layer in model.base_model.model:
        for owned in (layer.rst_weight["default"]._parameters, layer.base_layer._parameters):
            for name in list(owned):
                originals.append(weakref.ref(owned[name]))
                owned[name] = torch.nn.Parameter(owned[name].detach().clone(), owned[name].requires_grad)
    gc.collect()
    assert len(originals) == 12 and [r() for r in originals] == [None] * 12
    # and training goes on over the new tensors: the plan is built on them at the first step
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    group = model.base_model._reset_groups["default"]
    assert group.plan is not None and group.plan.weight_ids == {id(p) for p in model.parameters() if p.requires_grad}
