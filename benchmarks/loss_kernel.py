"""Benchmark of the fused cross entropy: time and peak temporary memory per implementation.

    python benchmarks/loss_kernel.py                 # defaults for the platform
    python benchmarks/loss_kernel.py --check --sweep # on a GPU: check against float64, tune tiles
    python benchmarks/loss_kernel.py --shapes 512,64,2048 --impls naive,chunked --iters 1

For each shape `N,D,V` it compiles the forward (`nll, lse`) and forward+backward
(`value_and_grad` of `Σ nll + 1e-4 Σ lse²`) for each implementation, reads the peak
temporary memory from `compiled.memory_analysis()`, times the median of `--iters` runs,
and prints a table with the ratios to "naive". `--memory-shapes` are compiled only.

It asserts the memory goals (not the time goals, which depend on the machine): no
`[N, V]`-sized buffer in the compiled fused programs, and at V >= 32768 a forward+backward
peak temporary memory at least 8x below naive.
On CPU the Pallas kernels only run in interpret mode (a test tool, not a fast path), so
the CPU defaults compare naive with chunked.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from metatrain.kernels import BlockSizes, fused_cross_entropy

CPU_SHAPES = ["8192,1024,32768"]
CPU_MEMORY_SHAPES = ["8192,1024,65536", "8192,1024,131072"]
GPU_SHAPES = ["16384,2048,32768", "16384,4096,65536", "16384,4096,131072"]
GPU_SWEEP = [  # rows, vocab, depth, warps, stages
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 8, 3),
]
GPU_CHUNKS = [1024, 2048, 4096]  # columns of bf16 dlogits materialised per backward step


@dataclasses.dataclass
class Row:
    shape: tuple[int, int, int]
    impl: str
    fwd_s: float | None
    fwd_bwd_s: float | None
    fwd_temp: int
    fwd_bwd_temp: int


def logits_sized_buffers(hlo: str, rows: int, vocab: int) -> list[str]:
    """Shapes in compiled HLO text with one dim >= rows and another >= vocab."""
    out = []
    for m in re.finditer(r"\b[a-z]+\d*\[(\d+),(\d+)\]", hlo):
        a, b = int(m.group(1)), int(m.group(2))
        if (a >= rows and b >= vocab) or (a >= vocab and b >= rows):
            out.append(m.group(0))
    return out


def make_fns(impl: str, blocks: BlockSizes | None):
    def forward(h, p, t):
        return fused_cross_entropy(h, p, t, impl=impl, block_sizes=blocks)

    def loss(h, p, t):
        nll, lse = forward(h, p, t)
        return jnp.sum(nll) + 1e-4 * jnp.sum(lse * lse)

    return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def inputs(shape, dtype, seed=0):
    n, d, v = shape
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
    projection = (jax.random.normal(k2, (d, v), jnp.float32) * (2.0 / d**0.5)).astype(dtype)
    targets = jax.random.randint(k3, (n,), 0, v, jnp.int32)
    return hidden, projection, targets


def timed(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shape, impl, dtype, iters, blocks, run: bool) -> Row:
    fwd, fwd_bwd = make_fns(impl, blocks)
    args = inputs(shape, dtype)
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    c_fwd = fwd.lower(*abstract).compile()
    c_bwd = fwd_bwd.lower(*abstract).compile()
    if impl != "naive" and shape[2] > 8192:  # below the largest chunk, a chunk may be all of V
        for compiled in (c_fwd, c_bwd):
            found = logits_sized_buffers(compiled.as_text(), shape[0], shape[2])
            assert not found, f"{impl} at {shape} has [N, V]-sized buffers: {sorted(set(found))[:4]}"
    row = Row(
        shape, impl, None, None,
        c_fwd.memory_analysis().temp_size_in_bytes, c_bwd.memory_analysis().temp_size_in_bytes,
    )
    if run:
        row.fwd_s = timed(c_fwd, args, iters)
        row.fwd_bwd_s = timed(c_bwd, args, iters)
    del args
    return row


def check(dtype) -> None:
    """Pallas and chunked against a float64 NumPy reference on ragged shapes, on this device."""
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    failed = []
    for shape in [(1000, 72, 1003), (2053, 512, 16411)]:
        h, p, t = inputs(shape, dtype, seed=1)
        g_nll = jax.random.normal(jax.random.key(2), (shape[0],))
        g_lse = jax.random.normal(jax.random.key(3), (shape[0],))
        mask = jnp.arange(shape[0]) % 7 != 3
        h64, p64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (h, p))
        logits = h64 @ p64
        top = logits.max(1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(1))
        rows = np.arange(shape[0])
        nll = lse - logits[rows, np.asarray(t)]
        m = np.asarray(mask)
        gn, gl = np.where(m, g_nll, 0)[:, None], np.where(m, g_lse, 0)[:, None]
        dl = (gn + gl) * np.exp(logits - lse[:, None])
        dl[rows, np.asarray(t)] -= gn[:, 0]
        ref = [np.where(m, nll, 0), np.where(m, lse, 0), dl @ p64.T, h64.T @ dl]
        for impl in ("pallas", "chunked"):
            @jax.jit
            def run(h, p):
                out, vjp = jax.vjp(lambda h, p: fused_cross_entropy(h, p, t, mask, impl=impl), h, p)
                return (*out, *vjp((g_nll, g_lse)))

            errs = []
            try:
                outputs = run(h, p)
            except Exception as err:
                print(f"check {impl} {jnp.dtype(dtype).name} {shape}: ERROR {str(err)[:300]}", flush=True)
                failed.append(f"{impl} {jnp.dtype(dtype).name} {shape}: error")
                continue
            for actual, expected in zip(outputs, ref):
                actual = np.asarray(actual.astype(jnp.float32), np.float64)
                errs.append(np.abs(actual - expected).max() / np.abs(expected).max())
            status = "ok" if max(errs) < tol else "FAIL"
            print(f"check {impl:8s} {jnp.dtype(dtype).name:8s} {shape}: rel err nll {errs[0]:.1e} "
                  f"lse {errs[1]:.1e} dh {errs[2]:.1e} dp {errs[3]:.1e}  [{status}]", flush=True)
            if status != "ok":
                failed.append(f"{impl} {jnp.dtype(dtype).name} {shape}: {max(errs):.2e} > {tol}")
    assert not failed, f"checks failed: {failed}"


def sweep(shape, dtype, iters) -> BlockSizes:
    """Pick GPU pallas tiles by forward time, then the backward chunk by fwd+bwd time."""
    best = None
    for rows, vocab, depth, warps, stages in GPU_SWEEP:
        blocks = BlockSizes(rows=rows, vocab=vocab, depth=depth, num_warps=warps, num_stages=stages)
        try:
            fwd, _ = make_fns("pallas", blocks)
            seconds = timed(fwd, inputs(shape, dtype), iters)
        except Exception as err:  # a configuration the compiler refuses
            print(f"sweep {blocks}: failed ({str(err)[:100]})", flush=True)
            continue
        print(f"sweep rows={rows} vocab={vocab} depth={depth} warps={warps} stages={stages}: "
              f"{seconds * 1e3:.2f} ms", flush=True)
        if best is None or seconds < best[0]:
            best = (seconds, blocks)
    if best is None:
        raise RuntimeError("no GPU tile configuration compiled")
    tiles = best[1]
    best = None
    for chunk in GPU_CHUNKS:
        blocks = dataclasses.replace(tiles, chunk=chunk)
        _, fwd_bwd = make_fns("pallas", blocks)
        seconds = timed(fwd_bwd, inputs(shape, dtype), iters)
        print(f"sweep chunk={chunk}: fwd+bwd {seconds * 1e3:.2f} ms", flush=True)
        if best is None or seconds < best[0]:
            best = (seconds, blocks)
    return best[1]


def fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:,.1f}"


def print_table(rows: list[Row], device: str, dtype) -> None:
    naive = {r.shape: r for r in rows if r.impl == "naive"}
    print(f"\ndevice: {device}; dtype {jnp.dtype(dtype).name}; time = median; "
          "temp = compiled.memory_analysis().temp_size_in_bytes\n")
    print("| N, D, V | impl | fwd ms | fwd+bwd ms | speed vs naive (fwd / fwd+bwd) "
          "| temp MiB fwd | temp MiB fwd+bwd | memory vs naive (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = naive.get(r.shape)
        speed = mem = "-"
        if base is not None and r.fwd_s and base.fwd_s:
            speed = f"{base.fwd_s / r.fwd_s:.2f}x / {base.fwd_bwd_s / r.fwd_bwd_s:.2f}x"
        if base is not None:
            mem = f"{base.fwd_bwd_temp / max(r.fwd_bwd_temp, 1):.1f}x less"
        print(f"| {','.join(map(str, r.shape))} | {r.impl} | {fmt_ms(r.fwd_s)} | {fmt_ms(r.fwd_bwd_s)} "
              f"| {speed} | {r.fwd_temp / 2**20:,.1f} | {r.fwd_bwd_temp / 2**20:,.1f} | {mem} |")


def main(argv=None) -> int:
    platform = jax.default_backend()
    on_cpu = platform == "cpu"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=CPU_SHAPES if on_cpu else GPU_SHAPES,
                    help="N,D,V triples to time")
    ap.add_argument("--memory-shapes", nargs="*", default=CPU_MEMORY_SHAPES if on_cpu else [],
                    help="N,D,V triples to compile for memory only")
    ap.add_argument("--impls", default="naive,chunked" if on_cpu else "naive,chunked,pallas")
    ap.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    ap.add_argument("--iters", type=int, default=2 if on_cpu else 5)
    ap.add_argument("--check", action="store_true", help="check against float64 first")
    ap.add_argument("--sweep", action="store_true", help="pick the GPU pallas tiles first")
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    impls = args.impls.split(",")
    device = f"{jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}"
    print(f"device: {device}", flush=True)

    errors = []
    if args.check:
        for check_dtype in (jnp.float32, jnp.bfloat16):
            try:
                check(check_dtype)
            except Exception:  # report, and still measure what works
                errors.append(traceback.format_exc(limit=4))
                print(errors[-1], flush=True)
    parse = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    blocks = None
    if args.sweep:
        try:
            blocks = sweep(parse(args.shapes[0]), dtype, args.iters)
            print(f"using {blocks}", flush=True)
        except Exception:
            errors.append(traceback.format_exc(limit=4))
            print(errors[-1], flush=True)

    rows = []
    for shapes, run in ((args.shapes, True), (args.memory_shapes, False)):
        for shape in map(parse, shapes):
            for impl in impls:
                try:
                    row = measure(shape, impl, dtype, args.iters, blocks if impl == "pallas" else None, run)
                except Exception:
                    errors.append(traceback.format_exc(limit=4))
                    print(f"{shape} {impl}: FAILED\n{errors[-1]}", flush=True)
                    continue
                rows.append(row)
                print(f"{shape} {impl}: fwd {fmt_ms(row.fwd_s)} ms, fwd+bwd {fmt_ms(row.fwd_bwd_s)} ms, "
                      f"temp {row.fwd_temp / 2**20:,.1f} / {row.fwd_bwd_temp / 2**20:,.1f} MiB", flush=True)
    print_table(rows, device, dtype)

    naive = {r.shape: r for r in rows if r.impl == "naive"}
    failures = []
    for r in rows:
        if r.impl != "naive" and r.shape in naive and r.shape[2] >= 32768:
            ratio = naive[r.shape].fwd_bwd_temp / max(r.fwd_bwd_temp, 1)
            if ratio < 8:
                failures.append(f"{r.impl} at {r.shape}: only {ratio:.1f}x less temp memory than naive")
    for f in failures:
        print(f"MEMORY GOAL MISSED: {f}")
    if errors:
        print(f"{len(errors)} step(s) failed (tracebacks above)")
    return 1 if failures or errors else 0


if __name__ == "__main__":
    sys.exit(main())
