"""The loss-scaling benchmark runs at tiny sizes and writes sane CSV, table and
plots; the throughput benchmark's synthetic batch is shaped as the real one, and
its variants (config overrides and XLA options) alternate and are compared bit
for bit."""

import csv
import os

import pytest

from conftest import load_tiny_config, tiny_overrides
from vlm_jax.bench import loss_scaling, throughput


def test_loss_scaling_cli_writes_csv_table_and_plots(tmp_path):
    out = tmp_path / "bench"
    rows = loss_scaling.main([
        "--kinds", "softmax,sigmoid", "--batch-sizes", "512,2048", "--dims", "16", "--devices", "1,4",
        "--reps", "2", "--out", str(out),
    ])
    assert len(rows) == 2 * 2 * 2 * 4  # kinds × N × B × impls
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for r in table:
        assert r["status"] == "ok", r
        assert float(r["step_ms_median"]) > 0 and float(r["compile_s"]) > 0
        assert int(r["temp_bytes"]) >= 0 and int(r["argument_bytes"]) > 0
        assert r["jax_version"] and r["device_kind"]
    by = {(r["kind"], r["impl"], int(r["batch"]), int(r["devices"])): r for r in table}
    # The dense baseline's temporaries grow like B², the tiled loss's (tile 64) like B.
    dense = [int(by[("softmax", "global_logits", b, 1)]["temp_bytes"]) for b in (512, 2048)]
    tiled = [int(by[("softmax", "tiled", b, 1)]["temp_bytes"]) for b in (512, 2048)]
    assert dense[1] > 12 * dense[0]  # 4× the batch
    assert tiled[1] < 3 * tiled[0]
    assert "× baseline" in (out / "results.md").read_text()
    for name in ("softmax_vs_batch.png", "sigmoid_vs_batch.png", "softmax_vs_devices.png"):
        assert os.path.getsize(out / name) > 1000


def test_max_batch_search_respects_the_budget(tmp_path):
    budget_gb = 4 / 1024  # 4 MiB per device
    best, tried = loss_scaling.max_batch("sigmoid", "all_gather", 16, 2, "float32", budget_gb)
    assert best > 0
    fitting = [r for r in tried if loss_scaling.fits(r, budget_gb * (1 << 30))]
    assert max(r.batch for r in fitting) == best
    assert any(not loss_scaling.fits(r, budget_gb * (1 << 30)) and r.batch > best for r in tried)
    tiled_best, _ = loss_scaling.max_batch("sigmoid", "tiled", 16, 2, "float32", budget_gb, tile=32)
    assert tiled_best > 4 * best  # memory-linear reaches much further on the same budget
    assert tiled_best % 64 == 0


def test_cost_models():
    assert loss_scaling.flop_model("softmax", "tiled", 10, 2) == ("8*B^2*d", 1600.0)
    assert loss_scaling.flop_model("sigmoid", "ring", 10, 2) == ("6*B^2*d", 1200.0)  # loss and gradients in one pass
    assert loss_scaling.comm_bytes_per_device("sigmoid", "ring", 8, 2, 4, 4) == 3 * 2 * 2 * 4 + 4 * 2 * 2 * 4
    assert loss_scaling.comm_bytes_per_device("sigmoid", "all_gather", 8, 2, 4, 4) == 2 * 3 * 2 * 2 * 4
    assert loss_scaling.comm_bytes_per_device("softmax", "ring", 8, 2, 1, 4) == 0.0


@pytest.mark.parametrize("spec", ["configs/default.py:unicl", "configs/default.py:negclip",
                                  "configs/default.py:region"])
def test_the_synthetic_batch_has_the_train_streams_fields_and_shapes(spec, data_dir):
    from vlm_jax import session
    from vlm_jax.bench.throughput import synthetic_batch
    from vlm_jax.data import pipeline

    cfg = load_tiny_config(data_dir, spec)
    run = session.setup(cfg)
    real = next(iter(pipeline.train_dataset(run.ds, cfg.data, cfg.model.text.max_len, 4, 0, fields=run.fields,
                                            augment=run.objective.augment)))
    fake = synthetic_batch(cfg, run, 4)
    assert {k: (v.shape, v.dtype) for k, v in fake.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}


def test_throughput_variants_alternate_and_tell_bit_identical_states(data_dir, capsys):
    memory_scheduler = "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"  # reorders, computes the same
    # optim.b1 changes Adam's first moment in the first step (a learning rate would not: the warm-up starts at 0)
    rows = throughput.main(["--config", "configs/default.py", *tiny_overrides(data_dir), "--batch", "8",
                            "--steps", "1", "--rounds", "2", "--matmul-size", "64",
                            "--variants", f";{memory_scheduler};optim.b1=0.5"])
    assert [len(r["round_ms"]) for r in rows] == [2, 2, 2]
    assert [r["overrides"] for r in rows] == ["(baseline)", memory_scheduler, "optim.b1=0.5"]
    assert rows[1]["state_digest"] == rows[0]["state_digest"] != rows[2]["state_digest"]
    assert rows[1]["temp_mib_per_device"] != rows[0]["temp_mib_per_device"]  # the option reached the compiler
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [line.rstrip(" |").rsplit("| ", 1)[1] for line in table] == ["yes", "yes", "no"]


@pytest.mark.parametrize("variant, says", [("xla_no_such_option=1", "xla_no_such_option"),
                                            ("xla_cpu_use_fusion_emitters", "needs a value")])
def test_a_bad_xla_option_is_an_error_line(data_dir, variant, says):
    with pytest.raises(SystemExit) as e:
        throughput.main(["--config", "configs/default.py", *tiny_overrides(data_dir), "--batch", "8",
                         "--steps", "1", "--variants", variant])
    assert str(e.value).startswith("error:") and says in str(e.value)
