"""Shared fixtures. Eight simulated CPU devices, set before JAX is imported."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same train step (new jit wrappers, subprocesses): a
# session-wide persistent compilation cache compiles each program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlm_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The embedded dataset's 'tiny' config, generated once per session."""
    from vlm_jax.data import shapes_tfds

    d = str(tmp_path_factory.mktemp("tfds"))
    shapes_tfds.prepare(d, "tiny")
    return d


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(loss, params, *batch, devices: int = 4) -> list[tuple[str, str]]:
    """(op, result shape) of every collective in the compiled value_and_grad of
    ``loss(params, *batch)``, each batch argument split over ``devices`` along
    its first axis and ``params`` replicated."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    rows = NamedSharding(mesh, P("data"))
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(NamedSharding(mesh, P()),) + (rows,) * len(batch))
    hlo = step.lower(params, *(jax.device_put(b, rows) for b in batch)).compile().as_text()
    found = []
    for line in hlo.splitlines():
        for op in COLLECTIVES:
            if f" {op}(" in line or f" {op}-start(" in line:
                found.append((op, line.split("=", 1)[1].split(op)[0].strip()))
    return found


def tiny_overrides(data_dir: str, **extra) -> list[str]:
    """Command-line overrides for a tiny, fast run of configs/default.py."""
    values = {
        "data.data_dir": data_dir,
        "data.dataset_config": "tiny",
        "model.embed_dim": 32,
        # a tiny ViT at 32 px (16 tokens) whatever configs/default.py's image tower is
        "model.image.tower": "vit",
        "data.image_size": 32,
        "model.image.stem": "(32, 64, 128)",
        "model.image.patch_size": 8,
        "model.image.width": 32,
        "model.image.depth": 1,
        "model.image.mlp_dim": 64,
        "model.image.num_heads": 2,
        "model.text.width": 32,
        "model.text.depth": 1,
        "model.text.mlp_dim": 64,
        "model.text.num_heads": 2,
        # one block in the objectives' own stacks too (CoCa's decoder, ALBEF's fusion encoder)
        "loss.decoder_depth": 1,
        "loss.fusion_depth": 1,
        "train.batch_size": 32,
        "train.steps": 24,
        "train.log_every": 2,
        "train.eval_every": 8,
        "train.checkpoint_every": 4,
        "train.progress": False,
        "optim.warmup_steps": 4,
        "optim.lr": 1e-3,  # the tiny model's, whatever the default recipe's
        "evals.zeroshot.max_examples": 64,
        "evals.zeroshot.batch_size": 32,
        "evals.retrieval.max_examples": 64,
        "evals.retrieval.batch_size": 32,
        # Probes and compositional probes have their own tests (tests/test_evaluators.py).
        "evals.linear_probe.splits": "()",
        "evals.fewshot.splits": "()",
        "evals.compositional.splits": "()",
        "evals.segmentation.splits": "()",  # dense evaluators: tests/test_dense_eval.py
        "evals.detection.splits": "()",
    }
    values.update(extra)
    return [f"--config.{k}={v}" for k, v in values.items()]


def load_tiny_config(data_dir: str, config_file: str = "configs/default.py", **extra):
    from vlm_jax import config as config_lib

    return config_lib.load_config(config_file, [o[len("--config."):] for o in tiny_overrides(data_dir, **extra)])


@pytest.fixture(scope="session")
def trained_softmax(data_dir, tmp_path_factory):
    """An uninterrupted tiny CLIP run: (workdir, metrics rows)."""
    from vlm_jax import metrics, train

    workdir = str(tmp_path_factory.mktemp("softmax_run"))
    train.train(load_tiny_config(data_dir), workdir)
    return workdir, metrics.read_metrics(workdir)
