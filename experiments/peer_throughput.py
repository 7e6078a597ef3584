"""Train-step examples/s of vlm_jax and open_clip on the same model, side by side.

    python experiments/peer_throughput.py [--sizes default wide] [--pairs 5] [--steps 4] [--devices 1 2]

Both frameworks train the same CLIP: OpenCLIP's ViT computation (class token
with its position embedding, ln_pre, no patch bias, exact GELU, LayerNorm
epsilon 1e-5; causal text pooled at the EOT token), which vlm_jax computes
with ``configs/published.py:openclip_*``'s options (and ``model.projections_2d``, which
changes no parameter and no function, only how the attention's projections are laid out as
matmuls), at these sizes:

- ``default``: the issue's tiny CLIP, ViT width 96, depth 3, patch 4 at 32 px;
  text width 96, depth 2, 16 tokens; embedding 64; batch 256;
- ``wide``: width 256, depth 6 in both towers, patch 8 at 64 px; batch 128;
- ``base`` (run by default on a GPU only): ViT-B/32's image tower (width 768,
  12 heads, depth 12, patch 32 at 224 px), a text tower of the same width and
  depth over 77 tokens, embedding 512; batch 256.

Same optimiser on both sides (AdamW, lr 1e-3, betas (0.9, 0.98), eps 1e-6,
weight decay 0.1, gradient clipping at norm 1), float32, a synthetic batch
already in memory (no input pipeline), two threads each. The parameter
counts are checked to agree, and vlm_jax's initial weights are exported into
the open_clip model so both train identical networks.

vlm_jax is timed on each of ``--devices`` CPU device counts (default 1 and
one per thread): the same network and global batch, the batch split over a
data-parallel mesh of that many devices (``mesh.data``), as a user gets with
``JAX_NUM_CPU_DEVICES``. open_clip runs in the peer environment
(``vlm_jax.bench.peer_env``) as a child process. Each device count is a
phase of its own: vlm_jax's step on that many devices is the only one
compiled in this process, a fresh child starts, and the two take turns for
``--pairs`` rounds; the ratio is to the child's rounds of the same phase.
(With the 1- and 2-device steps both compiled and taking turns, the
2-device step at the wide size ran up to 1.5× slower in some rounds, which
a training run, with one step, never sees. With one step compiled, some of
its steps are still slower on this project's VM, whose host takes back the
memory each step frees: docs/benchmarks.md.)
Every turn is one
untimed step, then ``--steps`` timed ones: the first step after the other
side's turn runs on cold caches and on memory the host has taken back while
the process sat idle (up to twice a step's time here), which no training run
sees. Each side's examples/s is the median over rounds of its steps' median
time. The last column gives, round by round, each side's kernel CPU time and the machine's steal
time per timed step: on a VM whose host takes freed memory back, the rounds that pay for it show
there (docs/benchmarks.md). The script re-executes itself as the train
command does (``vlm_jax.hostmem``: glibc's huge-page tunable, where the
kernel offers huge pages on request), and the child inherits it: both sides
allocate alike.

On a GPU (JAX's default backend), open_clip runs on CUDA and vlm_jax on one
GPU; ``--matmul`` sets float32 matmuls to TF32 (the default) or full float32
on both sides alike. ``VLM_JAX_PEER_PYTHON`` names an interpreter that
already holds torch and open_clip, where the peer environment cannot be
installed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from typing import Sequence

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

if __name__ == "__main__":
    # As `python -m vlm_jax.train` runs: glibc's huge-page tunable where it helps (vlm_jax.hostmem). The
    # open_clip child inherits the environment, so both sides allocate alike.
    from vlm_jax import hostmem

    hostmem.reexec_with_huge_pages()

import jax  # noqa: E402

from vlm_jax import rules, weights  # noqa: E402
from vlm_jax.bench import peer_env, throughput  # noqa: E402

SIZES = {
    "default": dict(width=96, depth=(3, 2), patch=4, image=32, ctx=16, embed=64, batch=256),
    "wide": dict(width=256, depth=(6, 6), patch=8, image=64, ctx=16, embed=64, batch=128),
    # For a GPU: ViT-B/32's image tower (width 768, 12 heads, depth 12, patch 32 at 224 px) and a text tower
    # of the same width and depth over 77 tokens; batch 256.
    "base": dict(width=768, heads=12, depth=(12, 12), patch=32, image=224, ctx=77, embed=512, batch=256),
}


def host_clock() -> tuple[float, float | None]:
    """(this process's kernel CPU seconds, the machine's steal seconds, None without /proc/stat) so
    far. Steal is time the hypervisor kept the VM's CPUs from running; on this project's VM, whose
    host takes freed memory back (free page reporting), a step that touches memory the host took
    pays in both (docs/benchmarks.md). The open_clip child runs this same function (``CHILD``)."""
    try:
        with open("/proc/stat") as f:
            steal = int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        steal = None
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime, steal


CHILD = r'''
from __future__ import annotations
import json, os, resource, sys, time
import numpy as np
import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from safetensors.torch import load_file

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
w, (di, dt) = spec["width"], spec["depth"]
model = CLIP(spec["embed"], dict(layers=di, width=w, head_width=w // spec["heads"], patch_size=spec["patch"],
                                 image_size=spec["image"]),
             dict(context_length=spec["ctx"], vocab_size=spec["vocab"], width=w, heads=spec["heads"], layers=dt))
model.load_state_dict(load_file(spec["weights"]), strict=True)
dev = torch.device(spec["device"])
if dev.type == "cuda":  # float32 matmuls and convolutions in TF32 or not, as vlm_jax's side is set
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = spec["tf32"]
model.to(dev).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
loss_fn = ClipLoss()
rng = np.random.default_rng(0)
b = spec["batch"]
images = torch.from_numpy(rng.standard_normal((b, 3, spec["image"], spec["image"]), dtype=np.float32))
tokens = np.zeros((b, spec["ctx"]), np.int64)
tokens[:, 1:-1] = rng.integers(1, spec["vocab"] - 2, (b, spec["ctx"] - 2))
tokens[:, 0], tokens[:, -1] = spec["vocab"] - 2, spec["vocab"] - 1
images, tokens = images.to(dev), torch.from_numpy(tokens).to(dev)

# host_clock: this module's, spliced in, so both sides read their clocks alike

def step():
    opt.zero_grad(set_to_none=True)
    img, txt, scale = model(images, tokens)
    loss = loss_fn(img, txt, scale)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())  # waits for the step's last kernel (a copy queued behind it) on a GPU

step()  # warm-up
print(json.dumps({"ready": True, "parameters": sum(p.numel() for p in model.parameters()),
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}), flush=True)
for line in sys.stdin:
    n = int(line)
    step()  # untimed: the first step of a turn pays for the other side's turn (caches, idle memory)
    times, before = [], host_clock()
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "clock": [before, host_clock()]}), flush=True)
'''.replace("# host_clock: this module's, spliced in, so both sides read their clocks alike\n",
            inspect.getsource(host_clock))


def overrides(size: dict) -> list[str]:
    w, (di, dt) = size["width"], size["depth"]
    heads = size.get("heads") or (w // 32 if w >= 128 else 4)
    return ["model.image.tower=vit", f"model.image.width={w}", f"model.image.depth={di}", f"model.image.mlp_dim={4 * w}",
            f"model.image.num_heads={heads}", f"model.image.patch_size={size['patch']}",
            f"data.image_size={size['image']}", "model.image.pool=cls", "model.image.ln_pre=True",
            "model.image.patch_bias=False", "model.image.act=gelu", "model.image.norm_eps=1e-5",
            "model.image.pixel_mean=()", "model.image.pixel_std=()", f"model.text.width={w}",
            f"model.text.depth={dt}", f"model.text.mlp_dim={4 * w}", f"model.text.num_heads={heads}",
            f"model.text.max_len={size['ctx']}", "model.text.pool=argmax", "model.text.mask_padding=False",
            "model.text.act=gelu", "model.text.norm_eps=1e-5", f"model.embed_dim={size['embed']}",
            "model.image.stem=()", "model.projections_2d=True", "optim.lr=1e-3", "optim.weight_decay=0.1",
            "optim.grad_clip=1.0", "optim.b1=0.9", "optim.b2=0.98", "optim.eps=1e-6"]


def clock_ms(before, after, steps: int) -> str:
    """Kernel / steal milliseconds a step between two ``host_clock`` readings."""
    per = [None if a is None or b is None else (b - a) * 1e3 / steps for a, b in zip(before, after)]
    return "/".join("—" if v is None else f"{v:.0f}" for v in per)


def measure(name: str, size: dict, python: str, pairs: int, steps: int, threads: int,
            device_counts: Sequence[int], peer_device: str, tf32: bool) -> dict:
    """One phase per device count n: vlm_jax's step on n devices, the only step compiled in this
    process, and open_clip's, in a process of its own for the phase, take turns for ``pairs``
    rounds; every turn is one untimed step, then ``steps`` timed ones. Both are released before the
    next phase."""
    spec, b = "configs/default.py", size["batch"]
    child_spec, ready, ours_n, phases = None, None, None, {}
    with tempfile.TemporaryDirectory(prefix="vlm_jax_peer_tp_") as tmp:
        for n in device_counts:  # the same network and batch, the batch split over n CPU devices (mesh.data=n)
            cfg, run, step, state, batch = throughput._prepare(spec, overrides(size) + [f"mesh.data={n}"], b)
            if child_spec is None:  # the initial weights (the same for every n), exported once
                params = rules._flat(jax.device_get(state["params"]))
                ours_n = int(sum(v.size for v in params.values()))
                path = os.path.join(tmp, "init.safetensors")
                weights.export_params(params, cfg, run.objective.scalar_names, path)
                child_spec = dict(size, heads=cfg.model.image.num_heads, vocab=run.model.text.vocab_size,
                                  weights=path, threads=threads, device=peer_device, tf32=tf32)
            # A fresh open_clip process each phase: both sides start every phase alike.
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            child = subprocess.Popen([python, "-c", CHILD, json.dumps(child_spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
            ready = json.loads(child.stdout.readline())
            if ready.get("parameters") != ours_n:
                raise RuntimeError(f"{name}: parameter counts differ: open_clip {ready.get('parameters')}, "
                                   f"vlm_jax {ours_n}")
            state, out = step(state, batch)  # compiled and warm
            jax.block_until_ready(out)
            peer_med, ours_med, peer_clock, ours_clock = [], [], [], []
            for _ in range(pairs):
                child.stdin.write(f"{steps}\n")
                child.stdin.flush()
                turn = json.loads(child.stdout.readline())
                peer_med.append(statistics.median(turn["times"]))
                peer_clock.append(clock_ms(*turn["clock"], steps))
                marks = []  # host_clock around the timed steps, as in the peer's turn
                state, median_s = throughput.time_round(step, state, batch, steps,
                                                        probe=lambda: marks.append(host_clock()))
                ours_med.append(median_s)
                ours_clock.append(clock_ms(*marks, steps))
            child.stdin.close()
            child.wait()
            phases[n] = {"open_clip_ms": [round(t * 1e3, 1) for t in peer_med],
                         "open_clip_eps": b / statistics.median(peer_med), "open_clip_clock": peer_clock,
                         "ms": [round(t * 1e3, 1) for t in ours_med], "eps": b / statistics.median(ours_med),
                         "clock": ours_clock}
            del step, state, batch, out
            jax.clear_caches()
    return {"size": name, "parameters": ours_n, "batch": b, "torch": ready["torch"], "peer_device": ready["device"],
            "phases": phases}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES),
                   help="default: default and wide; base too on a GPU")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per turn, after one untimed step")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each side")
    p.add_argument("--devices", type=int, nargs="+", default=None,
                   help="vlm_jax's device counts to time, each its own data-parallel mesh (default on a CPU: 1 "
                        "and --threads, one device per thread; on a GPU: 1)")
    p.add_argument("--matmul", choices=("tf32", "float32"), default="tf32",
                   help="on a GPU, float32 matmuls in TF32 (JAX's GPU default; OpenCLIP's training script turns "
                        "it on in PyTorch) or in full float32, on both sides alike; a CPU has no TF32")
    args = p.parse_args()
    # CPU devices are made when the backend starts: as many as the largest mesh needs, before any array exists.
    jax.config.update("jax_num_cpu_devices", max(args.devices or (1, args.threads)))
    gpu = jax.default_backend() == "gpu"
    counts = list(dict.fromkeys(args.devices or ((1,) if gpu else (1, args.threads))))  # phases in this order
    sizes = args.sizes or ["default", "wide"] + (["base"] if gpu else [])
    if gpu:
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.matmul == "tf32" else "float32")
    python = peer_env.ensure_venv()
    rows = [measure(n, SIZES[n], python, args.pairs, args.steps, args.threads, counts, "cuda" if gpu else "cpu",
                    args.matmul == "tf32") for n in sizes]
    matmul = f"float32 matmuls: {args.matmul}" if gpu else f"torch {args.threads} threads"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} "
          f"({jax.devices()[0].device_kind}); torch {rows[0]['torch']} ({rows[0]['peer_device']}); {matmul}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (both sides)")
    print(f"command: python experiments/peer_throughput.py {' '.join(sys.argv[1:])}\n")
    print("| model | parameters | batch | framework | ms/step (rounds) | examples/s | × open_clip "
          "| kernel / steal ms a step (rounds) |")
    print("|---|---|---|---|---|---|---|---|")
    peer_where, kind = ("CUDA", "GPU") if gpu else (f"{args.threads} threads", "CPU device")
    for r in rows:
        for n, v in r["phases"].items():
            where = f"1 {kind}" if n == 1 else f"{n} {kind}s (data parallel)"
            print(f"| {r['size']} | {r['parameters']:,} | {r['batch']} | open_clip, {peer_where} (beside {where}) | "
                  f"{' / '.join(map(str, v['open_clip_ms']))} | {v['open_clip_eps']:,.0f} | 1.00 | "
                  f"{' · '.join(v['open_clip_clock'])} |")
            print(f"| {r['size']} | {r['parameters']:,} | {r['batch']} | vlm_jax, {where} | {' / '.join(map(str, v['ms']))} | "
                  f"{v['eps']:,.0f} | **{v['eps'] / v['open_clip_eps']:.2f}×** | {' · '.join(v['clock'])} |")


if __name__ == "__main__":
    main()
