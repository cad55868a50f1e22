"""train.plan: the product's programs compiled by the TPU compiler for a slice, on this CPU box.

libtpu (requirements.txt) describes a slice's devices without a TPU; only the tiny model is
compiled here (seconds a program). The large models' figures are in docs/usage.md.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO

pytest.importorskip("libtpu", reason="libtpu (the tpu extra) is not installed")

from configs import tiny  # noqa: E402
from deebert_jax.core.errors import InputError  # noqa: E402
from deebert_jax.planning import chips, costs, plan as plan_lib, programs, report  # noqa: E402


@pytest.fixture(scope="module")
def one_host():
    return chips.slice_devices("v5e:2x2")


@pytest.fixture(scope="module")
def two_hosts():
    return chips.slice_devices("v5e:2x4")


def _tiny(**fields):
    cfg = tiny.get_config()
    cfg.update(fields)
    return cfg


def test_slices_as_a_run_lays_them_out(one_host, two_hosts):
    assert (one_host.chips, one_host.hosts) == (4, 1)
    assert (two_hosts.chips, two_hosts.hosts, two_hosts.chips_per_host) == (8, 2, 4)
    assert {d.platform for d in two_hosts.devices} == {"tpu"}
    v4 = chips.slice_devices("v4-32")   # Cloud TPU's name; one device per chip (megacore), as JAX runs v4
    assert (v4.topology, v4.chips, v4.hosts, v4.chip.generation) == ("v4:2x2x4", 16, 4, "v4")


@pytest.mark.parametrize("topology", ["v9:2x2", "v5e-8x", "v5e:3x3"])
def test_a_slice_libtpu_does_not_know_is_one_line(topology):
    with pytest.raises(InputError, match=r"^--topology=") as e:
        chips.slice_devices(topology)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("where", ["one_host", "two_hosts"])
def test_training_steps_compile_for_one_and_two_hosts(where, request):
    sl = request.getfixturevalue(where)
    cfg = _tiny()
    shape = programs.run_shape(cfg, sl)
    for program in programs.training_programs(cfg, shape, sl):
        r = report.compile_program(program, sl.chip)
        assert r.compiled and r.error is None, r.error
        assert r.fits and 0 < r.hbm["total"] < sl.chip.hbm_bytes
        assert r.hbm["aliased"] > 0           # the donated state is updated in place
        assert r.collectives["all-reduce"]["count"] >= 1   # gradients averaged over every chip of the slice
        assert r.cpu_custom_calls == [], r.custom_calls     # nothing CPU-tuned inside a TPU program
        assert r.matmul_flops == pytest.approx(r.analytic_matmul_flops, rel=0.05)
        assert r.floor_seconds > 0


def test_predictors_and_serving_compile(one_host):
    cfg = _tiny()
    shape = programs.run_shape(cfg, one_host)
    built = programs.inference_programs(shape, one_host) + programs.serving_programs(shape, one_host)
    names = [p.name for p in built]
    assert names == ["eval forward", "early_exit_predict", "exit_aware_predict", "serve admit, length 16",
                     "serve step, length 16"]
    for program in built:
        r = report.compile_program(program, one_host.chip)
        assert r.compiled, (program.name, r.error)
        assert r.fits and r.cpu_custom_calls == []
        assert not r.collectives      # each runs on one chip (the eval forward on each, alone)
    forward = built[0]
    assert report.costs_lib.jaxpr_costs(forward.trace()).matmul_flops == pytest.approx(
        forward.analytic_matmul_flops, rel=0.05)


@pytest.mark.parametrize("stage,loss", [(1, "labels"), (2, "labels"), (2, "distill")])
@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_step_flops_count_every_layer(one_host, stage, loss, pooling):
    """Four layers (a scan of three, then the first-token layer): every trip counted; XLA's own
    analysis, which counts a loop body once, would see about two layers."""
    cfg = _tiny(offramp_loss=loss)
    cfg.model.num_hidden_layers = 4
    cfg.model.ramp_pooling = pooling
    shape = programs.run_shape(cfg, one_host)
    program = next(p for p in programs.training_programs(cfg, shape, one_host) if p.stage == stage)
    jaxpr = program.trace()
    counted = costs.jaxpr_costs(jaxpr).matmul_flops
    assert counted == pytest.approx(program.analytic_matmul_flops, rel=0.05)
    assert costs.jaxpr_costs(jaxpr, loops_once=True).matmul_flops < 0.75 * counted


def test_loops_count_their_trips():
    def f(x, w):
        def body(c, _):
            return c @ w, None
        y = jax.lax.scan(body, x, None, length=5)[0]
        return jax.lax.while_loop(lambda c: c[0, 0] < 1e9, lambda c: jnp.tanh(c @ w), y)

    jaxpr = jax.make_jaxpr(f)(jnp.ones((4, 8)), jnp.ones((8, 8)))
    one = 2 * 4 * 8 * 8
    assert costs.jaxpr_costs(jaxpr, lambda path: 3).matmul_flops == (5 + 3) * one
    assert costs.jaxpr_costs(jaxpr, loops_once=True).matmul_flops == 2 * one


def test_collectives_read_from_hlo():
    text = ("  %all-reduce.3 = (f32[32]{0}, bf16[4,8]{1,0}) all-reduce(%a, %b), replica_groups={{0,1}}\n"
            "  %ag = f32[16]{0} all-gather-start(%c), dimensions={0}\n"
            "  ROOT %x = f32[1]{0} all-reduce(%d), to_apply=%sum\n")
    assert report.collectives(text) == {"all-reduce": {"count": 2, "bytes": 32 * 4 + 4 * 8 * 2 + 4},
                                        "all-gather": {"count": 1, "bytes": 64}}


def test_a_run_that_cannot_fit_is_refused_with_its_line():
    """Embeddings of 60M words (with Adam's moments, 36 GiB): no batch fits on a 16 GiB v5e."""
    cfg = _tiny(stages="1")
    cfg.model.vocab_size = 60_000_000
    with pytest.raises(plan_lib.PlanRefusal) as e:
        plan_lib.make_plan(cfg, "v5e:2x2", groups=("train",))
    message = str(e.value)
    assert message.startswith("stage 1 step at config.per_device_batch_size=4 needs ") and "\n" not in message
    assert "(the TPU compiler's figure), more than v5e's 15.75 GiB: no per-chip batch fits" in message
    assert e.value.plan["programs"][0]["error"].startswith("RESOURCE_EXHAUSTED")


def _fake_step(temporaries_at, usable=15.75 * 2**30, fixed=0.5 * 2**30):
    """A stage's step 'compiled' at a batch: temporaries from `temporaries_at`, refused over `usable`."""
    calls = []

    def compile_at(batch):
        calls.append(batch)
        temps = temporaries_at(batch)
        if temps + fixed > usable:
            return report.ProgramReport("stage 1 step", "", compiled=False, fits=False, error="RESOURCE_EXHAUSTED",
                                        needed_temporaries=temps, available_hbm=usable)
        hbm = {"arguments": fixed, "outputs": 0, "aliased": 0, "generated_code": 0, "temporaries": temps,
               "total": fixed + temps}
        return report.ProgramReport("stage 1 step", "", compiled=True, fits=True, hbm=hbm)
    return compile_at, calls


@pytest.mark.parametrize("configured", [8, 4000])
@pytest.mark.parametrize("bend", [-0.1, 0.0, 0.15])
def test_the_largest_batch_from_two_compiles_and_a_confirming_one(configured, bend):
    """Temporaries linear in the batch (and, bent, growing faster or slower than the line through
    two probes): the largest batch that fits is found in a few compiles, never one that does not."""
    per_row = 8 * 2**20
    temporaries = lambda b: 2**28 + per_row * b * (1 + bend * b / 2000)
    compile_at, calls = _fake_step(temporaries)
    found = plan_lib.largest_batch(compile_at, 16 * 2**30, 1, {configured: compile_at(configured)})
    truth = max(b for b in range(1, 5000) if temporaries(b) + 0.5 * 2**30 <= 15.75 * 2**30)
    assert found.largest is not None and found.largest <= truth
    assert found.largest >= 0.9 * truth
    assert len(calls) <= 6
    assert next(p for p in found.probes if p["batch"] == found.largest)["fits"]


@pytest.mark.slow
def test_a_run_over_hbm_is_told_the_largest_batch_the_compiler_accepts(one_host):
    cfg = _tiny(per_device_batch_size=40_000, train_limit=0, stages="1", max_seq_length=128)
    cfg.model.max_position_embeddings = 128
    with pytest.raises(plan_lib.PlanRefusal) as e:
        plan_lib.make_plan(cfg, "v5e:2x2", groups=("train",), train_examples=10_000_000)
    largest = e.value.plan["largest_batch"][0]["largest"]
    assert f"set config.per_device_batch_size={largest}" in str(e.value)
    confirmed = next(p for p in e.value.plan["largest_batch"][0]["probes"] if p["batch"] == largest)
    assert confirmed["fits"] and confirmed["hbm_total"] <= one_host.chip.hbm_bytes


def test_a_global_batch_that_does_not_divide_is_refused(one_host):
    with pytest.raises(InputError, match=r"^--global-batch-size=10 does not divide over the 4 chips of v5e:2x2: "
                                         r"use a multiple of 4 \(e\.g\. 8 or 12\)"):
        programs.run_shape(_tiny(), one_host, global_batch_size=10)


def test_train_dry_run_writes_the_plan_and_trains_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out, workdir = tmp_path / "plan.json", tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "train.train", "--config", str(REPO / "configs/tiny.py"),
                           f"--config.workdir={workdir}", "--dry-run", "--topology", "v5e:2x2", "--programs", "train",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage 1 step" in proc.stdout and "estimate" in proc.stdout
    plan = json.loads(out.read_text())
    assert [p["name"] for p in plan["programs"]] == ["stage 1 step", "stage 2 step"]
    assert plan["chips"] == 4 and all(p["compiled"] for p in plan["programs"])
    assert not workdir.exists()


def test_a_plan_without_a_slice_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "train.plan", "--config", str(REPO / "configs/tiny.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: --topology is required, e.g. --topology v5e:2x4 (a Cloud TPU "
                                                "slice to plan for)"]


def test_ordinary_commands_stay_quiet_with_libtpu_installed():
    """No TPU here: setup_process names the CPU, so JAX never loads libtpu for an ordinary command."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    code = ("from deebert_jax.cpu.process import setup_process; s = setup_process(); import jax; "
            "print(s.tpu_backend_skipped, jax.devices()[0].platform)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "cpu"]
    assert proc.stderr == ""
