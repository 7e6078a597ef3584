"""The structure new work plugs into: the import graph, an objective added by
one mapping line, and a loop that reads the device only when it must."""

import ast
import os
from typing import ClassVar

import jax
import numpy as np
import pytest

from conftest import load_tiny_config
from vlm_jax import losses, metrics, objectives, session, step as step_lib, train
from vlm_jax.data import pipeline

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vlm_jax")


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def _import_graph() -> dict[str, set[str]]:
    """module -> the vlm_jax modules it imports (anywhere in the file)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph


def test_no_module_imports_the_train_script_and_the_package_has_no_import_cycle():
    graph = _import_graph()
    assert {"vlm_jax.train", "vlm_jax.session", "vlm_jax.objectives", "vlm_jax.evaluators"} <= set(graph)
    assert not [m for m, deps in graph.items() if "vlm_jax.train" in deps]
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_nothing_outside_the_objectives_tests_the_loss_kind():
    for mod, path in _modules().items():
        if mod.startswith("vlm_jax.objectives") or mod == "vlm_jax.config":
            continue
        assert "loss.kind ==" not in open(path).read(), mod


# --------------------------------------------------------------------------- an objective added from outside


def _flip(example, rng):
    """A test augmentation: mirror the image with probability ½."""
    return {**example, "image": example["image"][:, ::-1] if rng.random() < 0.5 else example["image"]}


class FixedTemperatureCLIP(objectives.Contrastive):
    """CLIP with a temperature fixed by config: no parameter besides the towers."""

    CONFIG: ClassVar[dict] = {"fixed_log_t": 2.0}
    scalar_names: ClassVar[tuple] = ()
    augment = staticmethod(_flip)

    def init_parts(self, rng):
        return {}

    def combine(self, outputs, scalars, batch):
        log_t = jax.numpy.float32(self.loss.fixed_log_t)
        return losses.softmax_loss(outputs["zimg"], outputs["ztxt"], log_t, **self.loss_kw), {"log_temp": log_t}


@pytest.fixture
def fixed_t(monkeypatch):
    monkeypatch.setitem(objectives.OBJECTIVES, "fixed_t", FixedTemperatureCLIP)


def test_an_objective_plugs_in_with_one_mapping_line_and_trains(fixed_t, data_dir, tmp_path):
    cfg = load_tiny_config(data_dir, **{"loss.kind": "fixed_t", "loss.fixed_log_t": 2.5, "train.steps": 6,
                                        "train.log_every": 1, "train.eval_every": 0, "train.checkpoint_every": 100})
    run = session.setup(cfg)
    assert "log_t" not in run.abstract["params"]
    batch = next(iter(pipeline.train_dataset(run.ds, cfg.data, 16, 32, 0, augment=run.objective.augment)))
    plain = next(iter(pipeline.train_dataset(run.ds, cfg.data, 16, 32, 0)))
    flipped = [not np.array_equal(a, b) for a, b in zip(batch["image"], plain["image"])]
    assert 0 < sum(flipped) < len(flipped)  # the objective's augmentation reached the batch
    train.train(cfg, str(tmp_path))
    rows = metrics.read_metrics(str(tmp_path))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert all(r["train/log_temp"] == pytest.approx(2.5) for r in rows)


def test_a_new_objective_accumulates_exactly(fixed_t, data_dir):
    cfg = load_tiny_config(data_dir, **{"loss.kind": "fixed_t"})
    run = session.setup(cfg)
    params = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(0))["params"]
    local = next(iter(pipeline.train_dataset(run.ds, cfg.data, 16, 32, 0, augment=run.objective.augment)))
    batch = {k: jax.device_put(v, jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
             for k, v in local.items()}
    (l1, _), g1 = jax.jit(step_lib.make_grad_fn(run.objective, run.mesh, 1))(params, batch)
    (l2, _), g2 = jax.jit(step_lib.make_grad_fn(run.objective, run.mesh, 2))(params, batch)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)


def test_objective_config_checks_run_at_load(data_dir):
    from vlm_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config.data.label_key: loss.kind='unicl' needs a class-label feature"):
        load_tiny_config(data_dir, "configs/default.py:unicl", **{"data.label_key": ""})
    with pytest.raises(ConfigError, match=r"config.data.negative_words: give groups .*loss.kind='negclip'"):
        load_tiny_config(data_dir, "configs/default.py:negclip", **{"data.negative_words": "()"})
    with pytest.raises(ConfigError, match=r"config.loss.kind: must be one of"):
        load_tiny_config(data_dir, **{"loss.kind": "nope"})


# --------------------------------------------------------------------------- the asynchronous loop


def test_the_loop_reads_the_device_only_at_log_eval_and_checkpoint_steps(data_dir, tmp_path, monkeypatch):
    reads = []
    original = train.FiniteGuard.check

    def recording(self, pending):
        reads.append([s for s, _ in pending])
        return original(self, pending)

    monkeypatch.setattr(train.FiniteGuard, "check", recording)
    cfg = load_tiny_config(data_dir, **{"train.steps": 12, "train.log_every": 5, "train.checkpoint_every": 6,
                                        "train.eval_every": 0})
    train.train(cfg, str(tmp_path))
    assert reads == [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10], [11, 12]]


def test_a_non_finite_step_found_late_is_named_exactly_and_never_saved(data_dir, tmp_path):
    diverge = {"optim.lr": 1e30, "optim.warmup_steps": 1, "optim.grad_clip": 1e30, "train.steps": 12,
               "train.eval_every": 0}
    found = {}
    for every in (1, 5):
        cfg = load_tiny_config(data_dir, **diverge, **{"train.log_every": every, "train.checkpoint_every": every})
        workdir = tmp_path / f"every{every}"
        with pytest.raises(FloatingPointError, match=r"non-finite .* at step (\d+)") as info:
            train.train(cfg, str(workdir))
        found[every] = int(str(info.value).split("at step ")[1].split(";")[0])
        saved = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
        assert all(s < found[every] for s in saved), (saved, found)
    assert found[5] == found[1]  # read 5 steps at a time, the first bad step is still the one named
