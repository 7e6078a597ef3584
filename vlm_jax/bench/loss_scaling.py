"""Loss-scaling benchmark: memory, time and the largest batch of each loss impl.

For every (kind, impl, B, d, N, dtype) it compiles ``value_and_grad`` of the
loss over (z^I, z^T, log_t, bias) on an N-device mesh and records compile
time, step time (median and spread over repetitions after a warm-up, with
``block_until_ready``), XLA's compiled memory per device (temporaries,
arguments, outputs), the accelerator's peak memory where the backend reports
it, achieved FLOP/s against a stated model count, and the bytes each device
sends. Baselines measured in the same run: ``global_logits`` (the dense
formula under jit on globally sharded arrays, XLA choosing the collectives, as
a plain jit trainer does) and ``all_gather``.

``--max-batch --budget-gb G`` searches, by compiling only, for the largest
global batch whose forward+backward fits G GiB per device.

Importable without the data stack; the CLI lives in experiments/loss_scaling.py.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Iterable, Sequence

IMPLS = ("global_logits", "all_gather", "ring", "tiled")
KINDS = ("softmax", "sigmoid")


@dataclasses.dataclass
class Row:
    kind: str
    impl: str
    batch: int
    dim: int
    devices: int
    dtype: str
    tile: int
    compile_s: float
    step_ms_median: float
    step_ms_min: float
    step_ms_max: float
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    peak_bytes: int  # accelerator peak while running (-1 where the backend does not report it)
    flop_model: str
    model_flops: float
    achieved_tflops: float
    comm_bytes_per_device: float
    status: str
    machine: str
    jax_version: str
    device_kind: str


# --------------------------------------------------------------------------- models of cost

def flop_model(kind: str, impl: str, batch: int, dim: int) -> tuple[str, float]:
    """The FLOP count each impl is charged with (stated per row of the output).

    A stored logit matrix costs one forward product and two backward products:
    6·B²·d; the softmax all_gather computes each direction from its own
    gathered side, twice that; the softmax ring/tiled recompute each block
    once in the backward: 8·B²·d; the sigmoid ring/tiled compute the loss and
    its gradients in one pass: 6·B²·d."""
    b2d = float(batch) * batch * dim
    if impl in ("ring", "tiled") and kind == "softmax":
        return "8*B^2*d", 8 * b2d
    if kind == "softmax" and impl == "all_gather":
        return "12*B^2*d", 12 * b2d
    return "6*B^2*d", 6 * b2d


def comm_bytes_per_device(kind: str, impl: str, batch: int, dim: int, n: int, itemsize: int) -> float:
    """Bytes each device sends for one forward+backward (see docs/losses.md)."""
    if n == 1:
        return 0.0
    b = batch // n
    chunk = (n - 1) * b * dim * itemsize
    if impl == "global_logits":
        return float("nan")  # chosen by XLA's partitioner; not modelled
    if impl == "all_gather":
        modalities = 2 if kind == "softmax" else 1
        return 2.0 * modalities * chunk  # gather forward, reduce-scatter backward
    grad_chunk = (n - 1) * b * dim * 4 + b * dim * 4  # float32 accumulators, one extra hop home
    if kind == "sigmoid":  # one pass: the chunk and its gradient accumulator
        return float(chunk + grad_chunk)
    stats = n * b * 4 * 2  # column LSE (forward) and with the chunk (backward)
    return float(chunk + chunk + grad_chunk + 2 * stats)


# --------------------------------------------------------------------------- one measurement

def _loss_fn(kind: str, impl: str, mesh, tile: int | None):
    from vlm_jax import losses

    if impl == "global_logits":  # dense formula; XLA partitions the B×B logits
        if kind == "softmax":
            return lambda zi, zt, lt, b: losses.softmax_loss(zi, zt, lt)
        return lambda zi, zt, lt, b: losses.sigmoid_loss(zi, zt, lt, b)
    kw = dict(impl=impl, mesh=mesh, tile=tile if impl == "tiled" else None)
    if kind == "softmax":
        return lambda zi, zt, lt, b: losses.softmax_loss(zi, zt, lt, **kw)
    return lambda zi, zt, lt, b: losses.sigmoid_loss(zi, zt, lt, b, **kw)


def _compiled(kind, impl, batch, dim, n, dtype, tile):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))
    sh = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    z = jax.ShapeDtypeStruct((batch, dim), jnp.dtype(dtype), sharding=sh)
    s = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    f = jax.jit(jax.value_and_grad(_loss_fn(kind, impl, mesh, tile), argnums=(0, 1, 2, 3)))
    t0 = time.perf_counter()
    compiled = f.lower(z, z, s, s).compile()
    return compiled, time.perf_counter() - t0, mesh, sh, rep


def _memory(compiled) -> tuple[int, int, int]:
    m = compiled.memory_analysis()
    if m is None:
        return -1, -1, -1
    return int(m.temp_size_in_bytes), int(m.argument_size_in_bytes), int(m.output_size_in_bytes)


def _peak_bytes(devices) -> int:
    peaks = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else -1


def _environment() -> tuple[str, str, str]:
    import jax

    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
    return machine, jax.__version__, jax.devices()[0].device_kind


def measure(kind: str, impl: str, batch: int, dim: int, n: int, dtype: str = "float32", reps: int = 5,
            tile: int | None = None, run: bool = True) -> Row:
    """Compiles and (with ``run``) times one configuration."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    machine, jax_version, device_kind = _environment()
    name, flops = flop_model(kind, impl, batch, dim)
    comm = comm_bytes_per_device(kind, impl, batch, dim, n, jnp.dtype(dtype).itemsize)
    base = dict(kind=kind, impl=impl, batch=batch, dim=dim, devices=n, dtype=dtype,
                tile=(tile or 0) if impl == "tiled" else 0,
                flop_model=name, model_flops=flops, comm_bytes_per_device=comm,
                machine=machine, jax_version=jax_version, device_kind=device_kind)
    nan = float("nan")
    try:
        compiled, compile_s, mesh, sh, rep = _compiled(kind, impl, batch, dim, n, dtype, tile)
    except (RuntimeError, MemoryError) as e:  # XLA's errors; a size that does not compile is a result
        return Row(**base, compile_s=nan, step_ms_median=nan, step_ms_min=nan, step_ms_max=nan, temp_bytes=-1,
                   argument_bytes=-1, output_bytes=-1, peak_bytes=-1, achieved_tflops=nan,
                   status=f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    temp, args, outs = _memory(compiled)
    times: list[float] = []
    status = "compiled only"
    if run:
        rng = np.random.default_rng(0)

        def unit(shape):
            x = rng.standard_normal(shape, dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            return jax.device_put(jnp.asarray(x, dtype), sh)

        zi, zt = unit((batch, dim)), unit((batch, dim))
        lt = jax.device_put(jnp.float32(np.log(10.0)), rep)
        bias = jax.device_put(jnp.float32(-10.0), rep)
        try:
            jax.block_until_ready(compiled(zi, zt, lt, bias))  # warm-up
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(zi, zt, lt, bias))
                times.append(time.perf_counter() - t0)
            status = "ok"
        except (RuntimeError, MemoryError) as e:  # out of memory at run time is a result too
            status = f"run failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    med = statistics.median(times) if times else nan
    return Row(**base, compile_s=compile_s, step_ms_median=med * 1e3, step_ms_min=min(times, default=nan) * 1e3,
               step_ms_max=max(times, default=nan) * 1e3, temp_bytes=temp, argument_bytes=args, output_bytes=outs,
               peak_bytes=_peak_bytes(mesh.devices.flat) if times else -1,
               achieved_tflops=flops / med / 1e12 if times else nan, status=status)


def fits(row: Row, budget_bytes: float) -> bool:
    return row.temp_bytes >= 0 and row.temp_bytes + row.argument_bytes + row.output_bytes <= budget_bytes


def max_batch(kind: str, impl: str, dim: int, n: int, dtype: str, budget_gb: float, tile: int | None = None,
              start: int | None = None, limit: int = 1 << 26) -> tuple[int, list[Row]]:
    """Largest global batch (a multiple of 8·n, or of tile·n for impl="tiled")
    whose compiled per-device memory fits; compiles only."""
    budget = budget_gb * (1 << 30)
    step = (tile if impl == "tiled" and tile else 8) * n
    rows: list[Row] = []
    lo, b = 0, start or step * 64
    while b <= limit:  # doubling
        r = measure(kind, impl, b, dim, n, dtype, run=False, tile=tile)
        rows.append(r)
        if not fits(r, budget):
            break
        lo, b = b, b * 2
    hi = min(b, limit + step)
    while hi - lo > max(step, lo // 64):  # bisect to within 1/64
        mid = (lo + hi) // 2 // step * step
        if mid in (lo, hi):
            break
        r = measure(kind, impl, mid, dim, n, dtype, run=False, tile=tile)
        rows.append(r)
        lo, hi = (mid, hi) if fits(r, budget) else (lo, mid)
    return lo, rows


# --------------------------------------------------------------------------- output

COLUMNS = [f.name for f in dataclasses.fields(Row)]


def write_csv(rows: Sequence[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))


def _mib(x: int) -> str:
    return "—" if x < 0 else f"{x / (1 << 20):,.1f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per measurement, with each impl's time and memory as a ratio to
    the ``global_logits`` baseline of the same (kind, B, d, N, dtype)."""
    base = {(r.kind, r.batch, r.dim, r.devices, r.dtype): r for r in rows if r.impl == "global_logits"}
    lines = [
        "| kind | impl | B | d | N | dtype | compile s | step ms (min–max) | × baseline time | temp MiB/dev | × baseline temp | args+out MiB/dev | TFLOP/s (model) | comm MiB/dev | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base.get((r.kind, r.batch, r.dim, r.devices, r.dtype))
        t_ratio = f"{r.step_ms_median / ref.step_ms_median:.2f}" if ref and ref.step_ms_median == ref.step_ms_median and r.step_ms_median == r.step_ms_median else "—"
        m_ratio = f"{r.temp_bytes / ref.temp_bytes:.2f}" if ref and ref.temp_bytes > 0 and r.temp_bytes >= 0 else "—"
        step = "—" if r.step_ms_median != r.step_ms_median else f"{r.step_ms_median:,.1f} ({r.step_ms_min:,.1f}–{r.step_ms_max:,.1f})"
        comm = "—" if r.comm_bytes_per_device != r.comm_bytes_per_device else f"{r.comm_bytes_per_device / (1 << 20):,.2f}"
        flops = "—" if r.achieved_tflops != r.achieved_tflops else f"{r.achieved_tflops:.3f} ({r.flop_model})"
        lines.append(
            f"| {r.kind} | {r.impl}{f' t={r.tile}' if r.tile else ''} | {r.batch:,} | {r.dim} | {r.devices} | {r.dtype} | "
            f"{r.compile_s:.2f} | {step} | {t_ratio} | {_mib(r.temp_bytes)} | {m_ratio} | "
            f"{_mib(r.argument_bytes + r.output_bytes) if r.argument_bytes >= 0 else '—'} | {flops} | {comm} | {r.status} |"
        )
    return "\n".join(lines) + "\n"


def _finish(fig, axes, path: str) -> str:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(rows: Sequence[Row], out_dir: str) -> list[str]:
    """Log–log memory and time against B per impl, and memory against N at fixed b."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in rows if r.temp_bytes >= 0]
    for kind in sorted({r.kind for r in ok}):
        fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
        for impl in IMPLS:
            rs = sorted((r for r in ok if r.kind == kind and r.impl == impl), key=lambda r: (r.devices, r.batch))
            for n in sorted({r.devices for r in rs}):
                sel = [r for r in rs if r.devices == n]
                if len({r.batch for r in sel}) < 2:
                    continue
                label = f"{impl} N={n}"
                ax_m.loglog([r.batch for r in sel], [r.temp_bytes / (1 << 20) for r in sel], "o-", label=label)
                timed = [r for r in sel if r.step_ms_median == r.step_ms_median]
                if timed:
                    ax_t.loglog([r.batch for r in timed], [r.step_ms_median for r in timed], "o-", label=label)
        ax_m.set(xlabel="global batch B", ylabel="temporary memory per device (MiB)", title=f"{kind}: memory")
        ax_t.set(xlabel="global batch B", ylabel="value_and_grad time (ms)", title=f"{kind}: time")
        written.append(_finish(fig, (ax_m, ax_t), os.path.join(out_dir, f"{kind}_vs_batch.png")))

        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for impl in IMPLS:
            rs = [r for r in ok if r.kind == kind and r.impl == impl]
            by_b = {}
            for r in rs:
                by_b.setdefault(r.batch // r.devices, []).append(r)
            for b, sel in sorted(by_b.items()):
                sel = sorted(sel, key=lambda r: r.devices)
                if len(sel) >= 2:
                    ax.plot([r.devices for r in sel], [r.temp_bytes / (1 << 20) for r in sel], "o-", label=f"{impl} b={b}")
        ax.set(xlabel="devices N", ylabel="temporary memory per device (MiB)", title=f"{kind}: fixed per-device b")
        written.append(_finish(fig, (ax,), os.path.join(out_dir, f"{kind}_vs_devices.png")))
    return written


# --------------------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    """'1024,2**20' -> [1024, 1048576]."""
    out = []
    for x in text.split(","):
        base, _, exp = x.partition("**")
        out.append(int(base) ** int(exp) if exp else int(base))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python experiments/loss_scaling.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="softmax,sigmoid")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--batch-sizes", default="1024,4096,16384", help="global B, comma-separated")
    p.add_argument("--dims", default="512")
    p.add_argument("--devices", default="1,8", help="device counts N (on CPU: simulated devices)")
    p.add_argument("--per-device-batch", type=int, default=0,
                   help="if > 0, B = this × N for every N (memory at fixed b) instead of --batch-sizes")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tile", type=int, default=0, help="tile size for impl=tiled (0: automatic)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile-only", action="store_true", help="memory and compile time only, no execution")
    p.add_argument("--max-batch", action="store_true", help="search the largest B that fits --budget-gb")
    p.add_argument("--budget-gb", type=float, default=16.0)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    args.kinds = args.kinds.split(",")
    args.impls = args.impls.split(",")
    for k in args.kinds:
        if k not in KINDS:
            p.error(f"--kinds: unknown kind {k!r} (choose from {KINDS})")
    for i in args.impls:
        if i not in IMPLS:
            p.error(f"--impls: unknown impl {i!r} (choose from {IMPLS})")
    args.batch_sizes, args.dims, args.devices = _ints(args.batch_sizes), _ints(args.dims), _ints(args.devices)
    return args


def configurations(args) -> Iterable[tuple[str, str, int, int, int]]:
    for kind in args.kinds:
        for n in args.devices:
            batches = [args.per_device_batch * n] if args.per_device_batch else args.batch_sizes
            for d in args.dims:
                for batch in batches:
                    for impl in args.impls:
                        yield kind, impl, batch, d, n


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if "jax" not in sys.modules and max(args.devices) > 1:
        # Simulated CPU devices must be requested before JAX starts.
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(args.devices)}".strip()
    import jax

    if max(args.devices) > len(jax.devices()):
        raise SystemExit(f"error: --devices asks for {max(args.devices)} but JAX sees {len(jax.devices())}")
    os.makedirs(args.out, exist_ok=True)
    tile = args.tile or None
    rows: list[Row] = []
    if args.max_batch:
        lines = ["| kind | impl | d | N | dtype | budget GiB/dev | largest B |", "|---|---|---|---|---|---|---|"]
        for kind in args.kinds:
            for n in args.devices:
                for d in args.dims:
                    for impl in args.impls:
                        best, tried = max_batch(kind, impl, d, n, args.dtype, args.budget_gb, tile)
                        rows.extend(tried)
                        lines.append(f"| {kind} | {impl} | {d} | {n} | {args.dtype} | {args.budget_gb:g} | {best:,} |")
                        print(lines[-1], flush=True)
        with open(os.path.join(args.out, "max_batch.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    else:
        for kind, impl, batch, d, n in configurations(args):
            if impl != "global_logits" and batch % n:
                continue
            row = measure(kind, impl, batch, d, n, args.dtype, args.reps, tile, run=not args.compile_only)
            rows.append(row)
            print(f"{kind:8s} {impl:14s} B={batch:>9,} d={d} N={n} temp={_mib(row.temp_bytes)} MiB "
                  f"step={row.step_ms_median:.2f} ms {row.status}", flush=True)
    write_csv(rows, os.path.join(args.out, "results.csv"))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Machine: {rows[0].machine if rows else '?'}; jax {rows[0].jax_version if rows else '?'}; "
                f"device: {rows[0].device_kind if rows else '?'}\n\nCommand: {' '.join(sys.argv)}\n\n")
        f.write(markdown_table(rows))
    try:
        plot(rows, args.out)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[plot]')", file=sys.stderr)
    return rows
