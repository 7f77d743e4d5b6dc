"""Size and speed of the RST adapter encoding (`peft_rst.format`) on a ViT-B/16 vision tower, against the
information bound and against the release's pickled `(w - w0).to_sparse()`.

Run: python benchmarks/format_size.py [--dtype float32|bfloat16] [--patterns uniform,runs,rows] [--markdown]

For every density, changed entries are drawn per tensor over the 200 parameter tensors of CLIP ViT-B/16's vision
tower with projection (86,192,640 entries; shapes read from the transformers model built on the meta device):
- uniform: k ~ Binomial(numel, density) positions, uniformly at random (tiny tensors often get k = 0 or 1);
- runs: the same k, as contiguous runs of geometric length (mean 32) at random starts (clustered in memory);
- rows: the same k, uniformly inside 10 % of the tensor's rows (whole output neurons change, the rest do not).
Reported: our tensor bytes (`encoded_nbytes`, all 200 tensors incl. their 19-22-byte headers), the information bound
sum_i (log2 C(n_i, k_i) + k_i * value_bits) / 8, our ratio to it (in total, and per shape class for uniform), the
release's format measured with torch.save of the sparse tensors into a BytesIO, the safetensors file we would
write (peft-style keys; the per-key JSON header is the file's cost beyond tensor data), encode and decode times
(min of 3; the machine is shared, so also compare with the `sum` baseline: one torch.sum pass over all weights).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peft_rst.format import decode_sparse, encode_sparse, encoded_nbytes, tensor_fingerprint  # noqa: E402

DENSITIES = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05)
DTYPES = {"float32": (torch.float32, 32), "bfloat16": (torch.bfloat16, 16), "float16": (torch.float16, 16)}


def vit_b16_shapes() -> list[tuple[str, tuple[int, ...]]]:
    from transformers import CLIPVisionModelWithProjection
    from vit_b16 import vit_b16_config

    config = vit_b16_config()
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    total = sum(math.prod(s) for _, s in shapes)
    assert total == 86_192_640, total
    return shapes


def log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def sample_positions(shape: tuple[int, ...], density: float, pattern: str, rng: np.random.Generator) -> np.ndarray:
    n = math.prod(shape)
    k = int(rng.binomial(n, density))
    if k == 0:
        return np.zeros(0, np.int64)
    if pattern == "uniform":
        return np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    if pattern == "runs":
        chosen = np.zeros(n, bool)
        while (have := int(chosen.sum())) < k:
            need = k - have
            starts = rng.integers(0, n, max(1, need // 32 + 1))
            lengths = rng.geometric(1 / 32, starts.size)
            for s, length in zip(starts, lengths):
                chosen[s : s + length] = True
        pos = np.nonzero(chosen)[0]
        return np.sort(rng.choice(pos, k, replace=False)) if pos.size > k else pos
    if pattern == "rows":
        rows, cols = shape[0], n // shape[0]
        if len(shape) == 1:  # 1-D: 10 % of the entries as contiguous blocks of 8
            rows, cols = max(1, n // 8), 8 if n >= 8 else n
        picked = rng.choice(rows, max(1, math.ceil(rows * 0.1)), replace=False)
        pool = (picked[:, None] * cols + np.arange(cols)).reshape(-1)
        pool = pool[pool < n]
        if pool.size < k:  # density above 10 %: fall back to the whole tensor
            pool = np.arange(n)
        return np.sort(rng.choice(pool, k, replace=False)).astype(np.int64)
    raise ValueError(f"unknown pattern {pattern!r}")


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    """Min wall time over `repeats` calls (the machine is shared: the minimum is the least disturbed run)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


warnings.filterwarnings("ignore", message="Sparse invariant checks")


def release_save(entries: list[tuple[tuple[int, ...], np.ndarray, torch.Tensor]], repeats: int) -> tuple[int, float]:
    """torch.save of {name: sparse COO delta} as the release does (int64 (ndim, k) indices, fp32 values):
    (bytes, seconds to torch.load it back)."""
    state = {}
    for i, (shape, pos, values) in enumerate(entries):
        index = torch.stack(torch.unravel_index(torch.from_numpy(pos), shape)) if pos.size else None
        if index is None:
            index = torch.zeros(len(shape), 0, dtype=torch.int64)
        state[f"p{i:03d}"] = torch.sparse_coo_tensor(index, values.float(), shape).coalesce()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    # weights_only=False as the release (its torch predates the default); our own buffer, so nothing untrusted
    load_s, _ = best_of(lambda: torch.load(io.BytesIO(buffer.getvalue()), weights_only=False), repeats)
    return buffer.tell(), load_s


def release_spot_checks() -> list[str]:
    """Real `(w - w0).to_sparse()` pickles for a few sizes, against the (8 * ndim + 4) bytes-per-entry formula."""
    torch.manual_seed(0)
    lines = ["| tensor | k | torch.save bytes | (8*ndim+4)*k | pickle overhead |", "|---|---:|---:|---:|---:|"]
    for shape, k in [
        ((768, 768), 590),
        ((768, 768), 5898),
        ((3072, 768), 23593),
        ((768, 3, 16, 16), 590),
        ((768,), 1),
    ]:
        w0 = torch.randn(shape)
        w = w0.clone().reshape(-1)
        w[torch.randperm(w.numel())[:k]] += 1e-3
        buffer = io.BytesIO()
        torch.save({"delta": (w.reshape(shape) - w0).to_sparse()}, buffer)
        formula = (8 * len(shape) + 4) * k
        lines.append(f"| {shape} | {k} | {buffer.tell():,} | {formula:,} | {buffer.tell() - formula:,} |")
    return lines


def safetensors_file_nbytes(keyed_parts: dict[str, torch.Tensor]) -> int:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter_model.safetensors")
        save_file(keyed_parts, path)
        return os.path.getsize(path)


def peft_key(name: str) -> str:
    module, _, param = name.rpartition(".")
    return f"base_model.model.{module}.rst_weight.{param}"


def run(shapes, density: float, pattern: str, dtype: torch.dtype, value_bits: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    entries = []
    for _, shape in shapes:
        pos = sample_positions(shape, density, pattern, rng)
        entries.append((shape, pos, torch.from_numpy(rng.standard_normal(pos.size).astype(np.float32)).to(dtype)))
    index_tensors = [torch.from_numpy(pos) for _, pos, _ in entries]

    def encode_all():
        return [
            encode_sparse(idx, values, math.prod(shape), 1) for idx, (shape, _, values) in zip(index_tensors, entries)
        ]

    k_total = sum(pos.size for _, pos, _ in entries)
    repeats = 10 if k_total < 500_000 else 3  # small cases are quick: more repeats, less noise
    encode_s, encoded = best_of(encode_all, repeats)
    numels = [math.prod(shape) for shape, _, _ in entries]
    decode_s, decoded = best_of(lambda: [decode_sparse(p, n, "w") for p, n in zip(encoded, numels)], repeats)
    cpu_start = time.process_time()
    [decode_sparse(p, n, "w") for p, n in zip(encoded, numels)]
    decode_cpu_s = time.process_time() - cpu_start
    for data, (_, pos, values) in zip(decoded, entries):
        assert np.array_equal(data.indices.numpy(), pos) and torch.equal(data.values, values)

    sizes = [encoded_nbytes(p) for p in encoded]
    bounds = [(log2_binom(n, pos.size) + value_bits * pos.size) / 8 for n, (_, pos, _) in zip(numels, entries)]
    keyed = {f"{peft_key(name)}.{s}": t for (name, _), p in zip(shapes, encoded) for s, t in p.items()}
    return {
        "density": density,
        "pattern": pattern,
        "k": sum(pos.size for _, pos, _ in entries),
        "ours": sum(sizes),
        "bound": sum(bounds),
        "per_tensor": [(shape, pos.size, size, bound) for (shape, pos, _), size, bound in zip(entries, sizes, bounds)],
        "release": release_save(entries, repeats) if pattern == "uniform" else None,
        "file": safetensors_file_nbytes(keyed),
        "keys": len(keyed),
        "encode_ms": 1000 * encode_s,
        "decode_ms": 1000 * decode_s,
        "decode_cpu_ms": 1000 * decode_cpu_s,
    }


def shape_class(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if len(shape) > 1 else "vectors (768)"


def per_class_table(results: list[dict]) -> list[str]:
    """Per shape class: ours/bound over the class's tensors together, and the worst single tensor with k > 0."""
    classes = sorted({shape_class(s) for s, *_ in results[0]["per_tensor"]}, key=lambda c: -len(c))
    head = "| density | " + " | ".join(classes) + " |"
    lines = [head, "|---:|" + "---:|" * len(classes)]
    for r in results:
        cells = []
        for c in classes:
            rows = [(k, size, bound) for shape, k, size, bound in r["per_tensor"] if shape_class(shape) == c]
            total = sum(size for _, size, _ in rows) / max(sum(bound for _, _, bound in rows), 1e-9)
            worst = max((size / bound for k, size, bound in rows if k), default=float("nan"))
            mean_k = sum(k for k, _, _ in rows) / len(rows)
            cells.append(f"{total:.3f} / {worst:.3f} (k~{mean_k:,.0f})")
        lines.append(f"| {100 * r['density']:g} % | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--patterns", default="uniform,runs,rows")
    parser.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fingerprint", action="store_true", help="skip timing the fingerprint (allocates 345 MB)")
    args = parser.parse_args()
    dtype, value_bits = DTYPES[args.dtype]
    shapes = vit_b16_shapes()
    print(
        f"ViT-B/16 vision tower: {len(shapes)} tensors, {sum(math.prod(s) for _, s in shapes):,} entries; "
        f"values {args.dtype}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )

    header = (
        "| pattern | density | changed k | ours (bytes) | bound (bytes) | ours/bound | release (bytes) "
        "| release/ours | safetensors file (keys) | encode ms | decode ms |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    uniform = []
    for pattern in args.patterns.split(","):
        for density in (float(d) for d in args.densities.split(",")):
            r = run(shapes, density, pattern, dtype, value_bits, args.seed)
            uniform += [r] if pattern == "uniform" else []
            release = f"{r['release'][0]:,}" if r["release"] else "-"
            vs_release = f"{r['release'][0] / r['ours']:.1f}x" if r["release"] else "-"
            print(
                f"| {pattern} | {100 * density:g} % | {r['k']:,} | {r['ours']:,} | {r['bound']:,.0f} | "
                f"{r['ours'] / r['bound']:.3f} | {release} | {vs_release} | "
                f"{r['file']:,} ({r['keys']}) | {r['encode_ms']:.0f} | {r['decode_ms']:.1f} |",
                flush=True,
            )
    if uniform:
        print("\nuniform, per shape class: ours/bound over the class / worst single tensor (mean k per tensor)")
        print("\n".join(per_class_table(uniform)))

    # decode of ~100k entries spread over the model (the load-time target)
    r = run(shapes, 100_000 / 86_192_640, "uniform", dtype, value_bits, args.seed + 1)
    print(
        f"\ndecode of {r['k']:,} uniformly spread entries over {len(shapes)} tensors: {r['decode_ms']:.1f} ms wall "
        f"({r['decode_cpu_ms']:.1f} ms CPU); encode {r['encode_ms']:.1f} ms; the release's torch.load of the same "
        f"entries: {1000 * r['release'][1]:.1f} ms"
    )

    print("\nrelease format, real `(w - w0).to_sparse()` pickles:")
    print("\n".join(release_spot_checks()))

    if not args.no_fingerprint:
        torch.manual_seed(0)
        weights = [torch.randn(s) for _, s in shapes]
        fp_s, _ = best_of(lambda: [tensor_fingerprint(w) for w in weights])
        sum_s, _ = best_of(lambda: [w.numpy().view(np.int64).sum() for w in weights])
        print(
            f"\ntensor_fingerprint of all {len(shapes)} fp32 tensors: {1000 * fp_s:.0f} ms (baseline: one plain "
            f"numpy int64 sum over the same bytes {1000 * sum_s:.0f} ms, ratio {fp_s / sum_s:.1f})"
        )


if __name__ == "__main__":
    main()
