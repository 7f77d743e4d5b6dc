"""One ViT-B/16 base + N RST domain patches: load time, switch time and memory, next to full fine-tuned checkpoints.

Run: python benchmarks/rst_deploy.py [--adapters 12] [--changed 100000]

Targets (issue 3): switching the active adapter <= 10 ms for an adapter with 100k changed entries; loading one from
disk <= 50 ms (each file is dropped from the page cache first); memory per extra loaded adapter ~ its file size.
The comparison loads a full fine-tuned checkpoint of the same model (safetensors) into the model, which is what
switching domains costs without sparse patches.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModelWithProjection
from vit_b16 import vit_b16_config

import peft_rst


def base_model() -> CLIPVisionModelWithProjection:
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(vit_b16_config()).eval()


@torch.no_grad()
def make_adapter(folder: str, seed: int, changed: int) -> None:
    """An RST adapter whose W differs from w0 in `changed` entries spread over the whole tower, like training gives."""
    model = get_peft_model(base_model(), peft_rst.RSTConfig(tau=1e-6))
    weights = [
        w for m in model.modules() if isinstance(m, peft_rst.RSTLayer) for w in m.rst_weight["default"].values()
    ]
    sizes = torch.tensor([w.numel() for w in weights])
    generator = torch.Generator().manual_seed(seed)
    flat_positions = torch.randperm(int(sizes.sum()), generator=generator)[:changed].sort().values
    offsets = torch.cumsum(sizes, 0) - sizes
    owner = torch.searchsorted(torch.cumsum(sizes, 0), flat_positions, right=True)
    for i, w in enumerate(weights):
        local = flat_positions[owner == i] - offsets[i]
        w.view(-1)[local] += 1e-3 * torch.randn(local.numel(), generator=generator)
    model.save_pretrained(folder)


def evict_from_page_cache(*paths: str) -> None:
    """Ask the kernel to drop these files' cached pages, so that the next read comes from the disk.

    posix_fadvise(DONTNEED) needs no privileges; a virtual machine's host may still cache the disk underneath.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def adapter_files(folder: str) -> list[str]:
    return [os.path.join(folder, name) for name in ("adapter_model.safetensors", "adapter_config.json")]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=12, help="12 = the Office-Home transfer tasks")
    parser.add_argument("--changed", type=int, default=100_000)
    parser.add_argument("--switches", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:  # ~0.35 GB + 0.6 MB per adapter, removed even on Ctrl-C
        run(args, work)


def run(args: argparse.Namespace, work: str) -> None:
    folders = [os.path.join(work, f"task{i}") for i in range(args.adapters)]
    for i, folder in enumerate(folders):
        make_adapter(folder, i, args.changed)
    file_bytes = [os.path.getsize(os.path.join(f, "adapter_model.safetensors")) for f in folders]

    model = base_model()
    x = torch.randn(1, 3, 224, 224)
    gc.collect()  # the models that made the adapters are garbage now: free them before measuring RSS growth
    before = rss_bytes()
    start = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, folders[0], adapter_name="task0")
    first_load = time.perf_counter() - start
    load_times, rss_steps = [], []
    for i, folder in enumerate(folders[1:], start=1):
        evict_from_page_cache(*adapter_files(folder))
        rss0 = rss_bytes()
        start = time.perf_counter()
        peft_model.load_adapter(folder, adapter_name=f"task{i}")
        load_times.append(time.perf_counter() - start)
        rss_steps.append(rss_bytes() - rss0)
    adapters_rss = rss_bytes() - before
    # the same adapters again, from the page cache (under new names; this memory is not counted above)
    warm_times = []
    for i, folder in enumerate(folders[1:], start=1):
        start = time.perf_counter()
        peft_model.load_adapter(folder, adapter_name=f"again{i}")
        warm_times.append(time.perf_counter() - start)
        peft_model.delete_adapter(f"again{i}")

    switch_times = []
    with torch.no_grad():
        for k in range(args.switches):
            name = f"task{(k + 1) % args.adapters}"
            start = time.perf_counter()
            peft_model.set_adapter(name)
            switch_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        peft_model(pixel_values=x)
        forward = time.perf_counter() - start
    # after the switches, so that the switch plan has compiled every adapter (its 12 bytes per entry are counted)
    names = [f"task{i}" for i in range(args.adapters)]
    held = {name: peft_model.base_model.loaded_adapter_nbytes(name) for name in names}

    # the alternative: a full fine-tuned checkpoint per domain
    full_path = os.path.join(work, "full.safetensors")
    save_file({k: v.contiguous() for k, v in base_model().state_dict().items()}, full_path)
    plain = base_model()
    full_times, full_warm_times = [], []
    for _ in range(3):
        evict_from_page_cache(full_path)
        start = time.perf_counter()
        plain.load_state_dict(load_file(full_path))
        full_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        plain.load_state_dict(load_file(full_path))
        full_warm_times.append(time.perf_counter() - start)
    full_bytes = os.path.getsize(full_path)

    ms = 1000
    print(f"ViT-B/16 vision tower, {args.adapters} RST adapters with {args.changed:,} changed entries each")
    print(
        f"adapter file: {statistics.mean(file_bytes) / 1e6:.3f} MB (full checkpoint {full_bytes / 1e6:.1f} MB, "
        f"{full_bytes / statistics.mean(file_bytes):.0f}x larger)"
    )
    print(f"load first adapter (incl. fingerprinting the base once): {first_load * ms:.1f} ms")
    print(
        f"load each further adapter from disk: median {statistics.median(load_times) * ms:.1f} ms, "
        f"max {max(load_times) * ms:.1f} ms  (target <= 50 ms); "
        f"from the page cache: median {statistics.median(warm_times) * ms:.1f} ms"
    )
    print(
        f"switch active adapter: median {statistics.median(switch_times) * ms:.2f} ms, "
        f"max {max(switch_times) * ms:.2f} ms  (target <= 10 ms)"
    )
    print(
        f"load a full fine-tuned checkpoint instead: from disk median {statistics.median(full_times) * ms:.1f} ms, "
        f"from the page cache {statistics.median(full_warm_times) * ms:.1f} ms "
        f"-> switching is {statistics.median(full_warm_times) / statistics.median(switch_times):.0f}x faster "
        "than even the cached checkpoint"
    )
    print(
        f"memory held per adapter (entries + switch plan): {statistics.mean(held.values()) / 1e6:.3f} MB "
        f"(= {statistics.mean(held.values()) / statistics.mean(file_bytes):.2f}x its file); "
        f"RSS growth for {args.adapters} adapters: {adapters_rss / 1e6:.1f} MB, "
        f"median per extra adapter {statistics.median(rss_steps) / 1e6:.2f} MB"
    )
    print(f"forward after switching: {forward * ms:.0f} ms")


if __name__ == "__main__":
    main()
