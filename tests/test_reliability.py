"""Runs survive what clusters do to them: damaged checkpoints, preemption,
diverging steps, two writers, config changes on resume, mistakes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import load_tiny_config, tiny_overrides
from vlm_jax import checkpoint, metrics, session, step as step_lib, train, workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("train/examples_per_sec",)


def _det(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _copy(trained, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _restore_all(workdir, cfg):
    run = session.setup(cfg)
    mgr = checkpoint.manager(workdir, 100)
    target = session.with_shardings(run.abstract, run.state_sh)
    return {s: checkpoint.restore(mgr, s, target)[0] for s in mgr.all_steps()}


# --------------------------------------------------------------------------- finite or not saved


@pytest.mark.parametrize("lr", [1e40, 1e30])
def test_a_diverging_run_leaves_only_finite_checkpoints(lr, data_dir, tmp_path):
    cfg = load_tiny_config(data_dir, **{"optim.lr": lr, "optim.warmup_steps": 0, "optim.grad_clip": 1e30,
                                        "train.checkpoint_every": 1, "train.keep_checkpoints": 100,
                                        "train.steps": 6, "train.eval_every": 0})
    with pytest.raises(FloatingPointError, match=r"at step (\d+); stopped without saving") as info:
        train.train(cfg, str(tmp_path))
    bad = int(str(info.value).split("at step ")[1].split(";")[0])
    states = _restore_all(str(tmp_path), cfg)
    assert sorted(states) == list(range(1, bad))  # every step before the bad one, none after
    if lr == 1e40:
        assert bad == 1  # the update of step 1 is already infinite: nothing is saved at all
    else:
        assert bad > 1  # finite updates first: checkpoints to verify
    for step, state in states.items():
        for path, x in jax.tree_util.tree_leaves_with_path(state):
            assert np.all(np.isfinite(np.asarray(x, np.float64))), (step, path)


def test_skip_mode_keeps_the_old_state_and_counts(data_dir):
    cfg = load_tiny_config(data_dir, **{"train.nonfinite": "skip"})
    run = session.setup(cfg)
    state = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(0))
    state["params"]["log_t"] = jax.numpy.float32(np.inf)  # every loss is now non-finite
    before = jax.device_get(state)
    step = step_lib.make_train_step(cfg, run.objective, run.tx, run.schedule, run.mesh, run.state_sh)
    sh = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    batch = {"image": jax.device_put(np.zeros((32, 32, 32, 3), np.uint8), sh),
             "text": jax.device_put(np.ones((32, 16), np.int32), sh)}
    new, out = step(state, batch)
    new = jax.device_get(new)
    assert not out[step_lib.FINITE] and int(out["train/skipped_steps"]) == 1 and int(new["step"]) == 1
    for a, b in zip(jax.tree_util.tree_leaves((before["params"], before["opt_state"])),
                    jax.tree_util.tree_leaves((new["params"], new["opt_state"]))):
        np.testing.assert_array_equal(a, b)


def test_the_guard_stops_after_too_many_skipped_steps_in_a_row():
    flags = lambda *v: [(i + 1, np.bool_(x)) for i, x in enumerate(v)]  # noqa: E731
    assert train.FiniteGuard("skip", 2).check(flags(1, 0, 0, 1, 0, 0)) is None
    assert "at step 4, 3 such steps in a row" in train.FiniteGuard("skip", 2).check(flags(1, 0, 0, 0))
    assert "at step 2" in train.FiniteGuard("stop", 2).check(flags(1, 0, 1))


# --------------------------------------------------------------------------- damaged checkpoints


def _array_files(step_dir):
    """The state's array data files (OCDBT keeps them in .../d/), smallest first."""
    files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, "state"))
             if os.path.basename(root) == "d" for n in names]
    assert files, os.listdir(os.path.join(step_dir, "state"))
    return sorted(files, key=os.path.getsize)


def _flip_a_bit(step_dir):
    path = _array_files(step_dir)[-1]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _truncate(step_dir):
    path = _array_files(step_dir)[-1]
    os.truncate(path, os.path.getsize(path) // 2)


def _delete_metadata(step_dir):
    names = [n for n in ("_METADATA", "_sharding", "manifest.ocdbt") if os.path.exists(os.path.join(step_dir, "state", n))]
    os.remove(os.path.join(step_dir, "state", names[0]))


@pytest.mark.parametrize("damage", [_flip_a_bit, _truncate, _delete_metadata])
def test_a_damaged_latest_checkpoint_is_reported_moved_aside_and_the_previous_one_resumes(
        damage, trained_softmax, data_dir, tmp_path, capfd):
    reference_dir, reference = trained_softmax  # checkpoints 20 and 24
    workdir = _copy(reference_dir, tmp_path)
    damage(os.path.join(workdir, "checkpoints", "24"))
    train.train(load_tiny_config(data_dir), workdir)
    err = capfd.readouterr().err
    assert "checkpoint step 24" in err and "is damaged" in err and "resumed from" in err and "at step 20" in err
    assert os.listdir(os.path.join(workdir, checkpoint.DAMAGED_DIR))[0].startswith("24-")
    assert _det(metrics.read_metrics(workdir)) == _det(reference)  # as the uninterrupted run from step 20


def test_evaluate_reports_a_damaged_step(trained_softmax, data_dir, tmp_path):
    workdir = _copy(trained_softmax[0], tmp_path)
    _flip_a_bit(os.path.join(workdir, "checkpoints", "24"))
    from vlm_jax import evaluate

    with pytest.raises(SystemExit, match=r"error: checkpoint step 24 in .* is damaged"):
        evaluate.main(["--config", "configs/default.py", "--workdir", workdir] + tiny_overrides(data_dir))


def test_evaluating_a_run_that_is_saving_leaves_its_in_flight_checkpoint_alone(trained_softmax, data_dir, tmp_path):
    # A trainer's asynchronous save writes into <step>.orbax-checkpoint-tmp*
    # until it commits; a reader that cleaned such directories up removed a
    # live run's checkpoint and crashed the run (seen with evaluate on a run).
    workdir = _copy(trained_softmax[0], tmp_path)
    in_flight = os.path.join(workdir, "checkpoints", "28.orbax-checkpoint-tmp", "state.orbax-checkpoint-tmp")
    os.makedirs(in_flight)
    open(os.path.join(in_flight, "shard"), "w").close()
    from vlm_jax import evaluate

    step, _, _ = evaluate.evaluate_checkpoint(load_tiny_config(data_dir), workdir)
    assert step == 24 and os.path.exists(os.path.join(in_flight, "shard"))
    misspelt = str(tmp_path / "no_such_run")  # nothing is created for a reader
    with pytest.raises(SystemExit, match=r"error: --workdir .*no_such_run holds no checkpoint"):
        evaluate.main(["--config", "configs/default.py", "--workdir", misspelt] + tiny_overrides(data_dir))
    assert not os.path.exists(os.path.join(misspelt, "checkpoints"))


# --------------------------------------------------------------------------- preemption


@pytest.mark.slow
def test_sigterm_saves_and_the_restart_equals_the_uninterrupted_run(trained_softmax, data_dir, tmp_path):
    _, reference = trained_softmax
    workdir = str(tmp_path / "preempted")
    cmd = [sys.executable, "-m", "vlm_jax.train", "--config", "configs/default.py", "--workdir", workdir]
    cmd += tiny_overrides(data_dir)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "4")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a few steps past the checkpoint, mid-interval
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == train.EXIT_PREEMPTED, err[-2000:]
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert stopped < 24 and os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped)))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {stopped}" in done.stderr
    assert _det(metrics.read_metrics(workdir)) == _det(reference)


# --------------------------------------------------------------------------- one writer, explicit config changes


def test_a_second_trainer_on_a_locked_workdir_is_refused_with_the_holder_named(data_dir, tmp_path):
    with workdir_lib.Lock(str(tmp_path)):
        start = time.time()
        with pytest.raises(SystemExit, match=rf"error: --workdir .* is in use by pid {os.getpid()} on host"):
            train.main(["--config", "configs/default.py", "--workdir", str(tmp_path)] + tiny_overrides(data_dir))
        assert time.time() - start < 120  # refused at start-up, not after a timeout
    assert not os.path.exists(tmp_path / "checkpoints")


def test_a_changed_batch_size_is_refused_and_allowed_with_the_flag(trained_softmax, data_dir, tmp_path):
    workdir = _copy(trained_softmax[0], tmp_path)
    argv = ["--config", "configs/default.py", "--workdir", workdir] + tiny_overrides(
        data_dir, **{"train.batch_size": 64, "train.steps": 26, "train.eval_every": 0})
    with pytest.raises(SystemExit, match=r"config.train.batch_size was 32, now 64.*--allow_config_change"):
        train.main(argv)
    train.main(argv + ["--allow_config_change"])
    history = workdir_lib.read_history(workdir)
    assert [h["step"] for h in history] == [0, 24]
    assert history[0]["config"]["train"]["batch_size"] == 32 and history[1]["config"]["train"]["batch_size"] == 64
    assert history[1]["changes"]["config.train.batch_size"] == [32, 64]
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["batch_size"] == 64
    assert metrics.read_metrics(workdir)[-1]["step"] == 26


def test_a_field_added_since_the_run_started_passes_only_at_its_default(tmp_path):
    from vlm_jax.config import ConfigError, base_config

    defaults = base_config().to_dict()
    old = json.loads(json.dumps(defaults, default=list))
    del old["model"]["image"]["stem"]  # a workdir written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    new = base_config()
    assert workdir_lib.check_resume(str(tmp_path), new.to_dict(), 10, False, defaults) == {}
    new.model.image.stem = (16,)
    with pytest.raises(ConfigError, match=r"config.model.image.stem was '<absent>', now \[16\]"):
        workdir_lib.check_resume(str(tmp_path), new.to_dict(), 10, False, defaults)
    with pytest.raises(ConfigError, match=r"config.model.image.stem was '<absent>', now \[\]"):  # no defaults: strict
        workdir_lib.check_resume(str(tmp_path), base_config().to_dict(), 10, False)


def test_an_input_digest_is_compared_only_where_the_run_recorded_one(tmp_path):
    from vlm_jax.config import ConfigError, base_config

    defaults = base_config().to_dict()
    old = json.loads(json.dumps(defaults, default=list))  # a run recorded before input digests existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    new = {**base_config().to_dict(), workdir_lib.INPUTS: {"index_file_sha256": "ab"}}
    assert workdir_lib.check_resume(str(tmp_path), new, 10, False, defaults) == {}
    (tmp_path / "config.json").write_text(json.dumps({**old, workdir_lib.INPUTS: {"index_file_sha256": "cd"}}))
    with pytest.raises(ConfigError, match=r"config.inputs.index_file_sha256 was 'cd', now 'ab'"):
        workdir_lib.check_resume(str(tmp_path), new, 10, False, defaults)


def test_extending_the_run_needs_no_flag(trained_softmax, data_dir, tmp_path):
    workdir = _copy(trained_softmax[0], tmp_path)
    train.train(load_tiny_config(data_dir, **{"train.steps": 26, "train.eval_every": 0}), workdir)
    assert metrics.read_metrics(workdir)[-1]["step"] == 26


@pytest.mark.slow
def test_resuming_on_half_the_devices_continues_the_same_batches(trained_softmax, data_dir, tmp_path):
    _, reference = trained_softmax  # 8 devices
    workdir = _copy(trained_softmax[0], tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "vlm_jax.train", "--config", "configs/default.py", "--workdir", workdir]
    done = subprocess.run(cmd + tiny_overrides(data_dir), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for a, b in zip(rows, reference):  # other devices, other summation order: equal to float32 rounding
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)


# --------------------------------------------------------------------------- mistakes are one error line


def _cli(args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "vlm_jax.train"] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_each_mistake_is_one_error_line_without_a_traceback(data_dir, tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "typo.py").write_text("from vlm_jax.config import base_config\n"
                                      "def get_config():\n    return base_config().train.steps + 'x'\n")
    (tmp_path / "afile").write_text("")
    base = ["--workdir", str(tmp_path / "w")]
    cases = {
        "line 1: syntax error": ["--config", str(tmp_path / "syntax.py")] + base,
        "get_config() raised TypeError": ["--config", str(tmp_path / "typo.py")] + base,
        "config.loss.tile: 3 does not divide the per-device batch 4": ["--config", "configs/default.py"] + base
        + tiny_overrides(data_dir, **{"loss.impl": "tiled", "loss.tile": 3}),
        "config.data.data_dir": ["--config", "configs/default.py"] + base
        + tiny_overrides(data_dir, **{"data.data_dir": str(tmp_path / "afile")}),
        "a file of that name is in the way": ["--config", "configs/default.py", "--workdir", str(tmp_path / "afile")]
        + tiny_overrides(data_dir),
    }
    for expected, args in cases.items():
        out = _cli(args)
        assert out.returncode != 0 and "Traceback" not in out.stderr, (expected, out.stderr[-2000:])
        assert out.stderr.strip().splitlines()[-1].startswith("error: ") and expected in out.stderr, out.stderr[-800:]
    assert not os.path.exists(tmp_path / "w")  # nothing was created for a refused run


def test_a_damaged_data_record_is_an_error_line_naming_the_dataset_and_the_fix(data_dir, tmp_path):
    bad = str(tmp_path / "tfds")
    shutil.copytree(data_dir, bad)
    from vlm_jax.data import shapes_tfds

    path = os.path.join(bad, "vlm_shapes", "tiny", str(shapes_tfds.VlmShapes.VERSION),
                        "vlm_shapes-train.array_record-00000-of-00001")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        f.write(b"\xff" * (os.path.getsize(path) // 3))
    with pytest.raises(SystemExit, match=r"error: config.data: reading the batch of step 1 from 'vlm_shapes' .* "
                                         r"failed .*re-prepare the dataset"):
        train.main(["--config", "configs/default.py", "--workdir", str(tmp_path / "w")]
                   + tiny_overrides(bad, **{"train.eval_every": 0}))


@pytest.mark.parametrize("where", ["save", "wait_until_finished"])
def test_a_checkpoint_write_that_fails_is_an_error_line_and_the_complete_ones_stay(where, data_dir, tmp_path,
                                                                                    monkeypatch):
    # orbax reports a failed write (a full disk, a directory removed under the
    # save) as it starts the next save or as the loop waits for the one in
    # flight, under types of its own: simulated at the second call of either.
    import orbax.checkpoint as ocp

    original = getattr(ocp.CheckpointManager, where)
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("Checkpoint directory does not exist: 8.orbax-checkpoint-tmp")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, where, failing)
    argv = ["--config", "configs/default.py", "--workdir", str(tmp_path / "w")] + tiny_overrides(
        data_dir, **{"train.eval_every": 0, "train.log_every": 4, "train.checkpoint_every": 4})
    with pytest.raises(SystemExit, match=r"^error: writing a checkpoint to --workdir .* failed \(.*Checkpoint "
                                         r"directory does not exist.*\); the checkpoints already complete are intact"):
        train.main(argv)
    monkeypatch.setattr(ocp.CheckpointManager, where, original)
    restored = _restore_all(str(tmp_path / "w"), load_tiny_config(data_dir))
    assert 4 in restored and max(restored) < 24  # verified and restorable; the run stopped at the failure


def test_a_full_disk_or_read_only_workdir_is_an_error_line_and_the_checkpoints_stay(data_dir, tmp_path, monkeypatch):
    # This machine's tests run as root (permissions do not apply) on a disk with room: the
    # failures are simulated where the loop meets them, to check what the user is told.
    import errno

    from vlm_jax import metrics as metrics_lib

    calls = []

    def full(self, step, row):
        calls.append(step)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.path))
        return original(self, step, row)

    original = metrics_lib.MetricsWriter.write
    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", full)
    argv = ["--config", "configs/default.py", "--workdir", str(tmp_path / "w")] + tiny_overrides(
        data_dir, **{"train.eval_every": 0, "train.log_every": 4, "train.checkpoint_every": 4})
    with pytest.raises(SystemExit, match=r"error: writing to --workdir .* failed \(No space left on device: .*"
                                         r"metrics.jsonl\); the checkpoints already complete are intact"):
        train.main(argv)
    cfg = load_tiny_config(data_dir)
    assert sorted(_restore_all(str(tmp_path / "w"), cfg)) == [4, 8]  # verified, restorable
    monkeypatch.setattr(train.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit, match=r"error: --workdir .*: not writable"):
        train.main(argv[:3] + [str(tmp_path / "ro")] + argv[4:])
