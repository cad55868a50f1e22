"""The serving scheduler (pure) and engine: random arrival schedules, driven step by step, give
row for row `exit_aware_predict`'s exits under every schedule; each schedule's order (arrivals:
a new row starts on the next step however deep the others are); nothing recompiles."""

import numpy as np
import pytest
from test_exit_aware import random_params, safe_thresholds

from conftest import ragged_batch
from deebert_jax.core.config import tiny_config
from deebert_jax.inference.early_exit import entropy
from deebert_jax.inference.exit_aware import exit_aware_predict
from deebert_jax.model.inference_step import forward
from deebert_jax.serving import engine as engine_lib
from deebert_jax.serving.engine import Engine
from deebert_jax.serving.requests import Row
from deebert_jax.serving.scheduler import SCHEDULES, Scheduler

CONFIG = tiny_config(num_hidden_layers=4, num_labels=3)
LENGTHS = (8, 16)
BUCKETS = (4,)   # one bucket size: half the compiling of (4, 2)
N = 37


# -- the scheduler alone -----------------------------------------------------------------------

def test_scheduler_runs_the_deepest_group_first_and_admits_into_free_slots():
    s = Scheduler(num_layers=3, lengths=(8, 16), pool_size=2, schedule="deepest")
    for key, length in (("a", 8), ("b", 8), ("c", 8), ("d", 16)):
        s.submit(key, length)
    first = s.next_step()  # two layer-0 groups: the one holding the oldest row, up to 2 free slots
    assert (first.length, first.layer, [k for k, _ in first.admit]) == (8, 0, ["a", "b"])
    assert s.complete(first, [True, False]) == [(0, "a")]  # a exits at layer 1, b moves on
    step = s.next_step()
    assert (step.length, step.layer, step.slots) == (8, 1, (first.slots[1],))  # b is deepest
    assert s.complete(step, [False]) == []
    step = s.next_step()
    assert (step.length, step.layer) == (8, 2)
    assert s.complete(step, [False]) == [(0, "b")]  # the last layer always exits
    step = s.next_step()  # c (admitted into a freed slot) and d: the oldest first
    assert (step.length, [k for k, _ in step.admit]) == (8, ["c"])
    assert s.cancel("d") and not s.cancel("c")  # waiting rows can be dropped, running ones not
    s.complete(step, [True])
    assert s.next_step() is None and not s.has_work()
    with pytest.raises(ValueError, match="length 32"):
        s.submit("e", 32)


def test_scheduler_pool_bounds_rows_in_flight():
    s = Scheduler(num_layers=2, lengths=(8,), pool_size=3, schedule="deepest")
    for key in range(5):
        s.submit(key, 8)
    step = s.next_step()
    assert len(step.slots) == 3 and s.running() == 3 and s.waiting() == 2
    with pytest.raises(ValueError, match="2 exit flags"):
        s.complete(step, [True, True])
    assert s.complete(step, [True, False, True]) == [(0, 0), (2, 2)]
    step = s.next_step()  # row 1 at layer 1 is deeper than the two waiting rows
    assert (step.layer, len(step.slots), step.admit) == (1, 1, ())
    s.complete(step, [False])
    step = s.next_step()
    assert [k for k, _ in step.admit] == [3, 4]


def _run(s, step, exited=None):
    """Completes `step` (no row exits unless `exited`) -> (length, layer, admitted keys) it ran."""
    s.complete(step, exited or [False] * len(step.slots))
    return step.length, step.layer, [k for k, _ in step.admit]


def test_arrivals_start_on_the_next_step_while_others_are_deep():
    s = Scheduler(num_layers=4, lengths=(8, 16), pool_size=4)  # the default schedule: arrivals
    assert s.schedule == "arrivals"
    s.submit("a", 8)
    s.submit("b", 8)
    assert _run(s, s.next_step()) == (8, 0, ["a", "b"])
    assert _run(s, s.next_step()) == (8, 1, [])
    s.submit("c", 16)
    s.submit("d", 8)  # a and b are at layer 2 of 4: c and d start now, the oldest waiting first
    assert _run(s, s.next_step()) == (16, 0, ["c"])
    assert _run(s, s.next_step()) == (8, 0, ["d"])
    assert _run(s, s.next_step()) == (8, 2, [])  # nobody waits: the deepest group
    s.submit("e", 8)
    assert _run(s, s.next_step()) == (8, 0, ["e"])  # e pre-empts a and b at layer 3
    assert _run(s, s.next_step(), [True, True]) == (8, 3, [])  # a and b: their last layer
    assert _run(s, s.next_step(), [True]) == (16, 1, [])  # c (older than d) exits at layer 2
    step = s.next_step()  # d and e, both at layer 1, run as one group
    assert (step.length, step.layer, len(step.slots)) == (8, 1, 2)


def test_arrivals_wait_only_for_a_free_slot():
    s = Scheduler(num_layers=3, lengths=(8,), pool_size=2)
    for key in "abc":
        s.submit(key, 8)
    assert _run(s, s.next_step()) == (8, 0, ["a", "b"])
    # c waits: the pool is full, so the rows in flight run (deepest first) until one exits.
    assert _run(s, s.next_step(), [True, False]) == (8, 1, [])
    assert _run(s, s.next_step()) == (8, 0, ["c"])


def test_arrivals_wait_while_the_rows_in_flight_are_past_the_budget():
    now = [0.0]
    s = Scheduler(num_layers=4, lengths=(8,), pool_size=4, admit_budget_s=0.05, clock=lambda: now[0])
    s.submit("a", 8)
    assert _run(s, s.next_step()) == (8, 0, ["a"])
    now[0] = 0.05
    s.submit("b", 8)   # a has been in flight 50 ms, within the budget: b starts at once
    assert _run(s, s.next_step()) == (8, 0, ["b"])
    now[0] = 0.051
    s.submit("c", 8)   # a is late now: the rows in flight (a and b, one group) go first
    assert _run(s, s.next_step()) == (8, 1, [])
    assert _run(s, s.next_step(), [True, False]) == (8, 2, [])   # a exits; b (1 ms old) is within budget
    assert _run(s, s.next_step()) == (8, 0, ["c"])
    with pytest.raises(ValueError, match="admit_budget_s"):
        Scheduler(num_layers=2, lengths=(8,), pool_size=2, admit_budget_s=-1)


def test_shallowest_lets_new_rows_catch_up_and_merge():
    s = Scheduler(num_layers=4, lengths=(8,), pool_size=4, schedule="shallowest")
    s.submit("a", 8)
    assert _run(s, s.next_step()) == (8, 0, ["a"])
    assert _run(s, s.next_step()) == (8, 1, [])
    s.submit("b", 8)
    assert _run(s, s.next_step()) == (8, 0, ["b"])
    assert _run(s, s.next_step()) == (8, 1, [])   # b catches up with a (layer 2) ...
    step = s.next_step()
    assert (step.layer, len(step.slots)) == (2, 2)  # ... and they run together


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule 'fifo'"):
        Scheduler(num_layers=2, lengths=(8,), pool_size=2, schedule="fifo")


# -- the engine against exit_aware_predict ------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    params = random_params(CONFIG, 0)
    ids, mask, types = ragged_batch(N, max(LENGTHS), CONFIG.vocab_size, 5, min_length=2, type_fraction=0.3)
    return params, (ids, mask, types)


def rows_of(batch):
    ids, mask, types = batch
    rows = []
    for i in range(len(ids)):
        size = next(n for n in LENGTHS if n >= mask[i].sum())
        rows.append(Row(ids[i, :size], mask[i, :size], types[i, :size], False))
    return rows


def drive(engine, rows, seed):
    """Submits the rows in a random order, a random few at a time between single steps, then
    runs to the end -> {row: (logits, exit_layer)}; checks each row is answered exactly once."""
    rng = np.random.default_rng(seed)
    order, answers, k = rng.permutation(len(rows)), {}, 0

    def callback(i):
        def got(logits, layer):
            assert i not in answers, f"row {i} answered twice"
            answers[i] = (np.array(logits), layer)
        return got

    while k < len(rows):
        burst = order[k:k + int(rng.integers(1, 7))]
        k += len(burst)
        engine.submit([rows[i] for i in burst], [callback(i) for i in burst])
        for _ in range(int(rng.integers(0, 3))):
            engine.step()
    while engine.step():
        pass
    assert sorted(answers) == list(range(len(rows))) and engine.pending() == 0
    return answers


# Entropy (a stateless rule, as max_prob) and patience (per-row rule state carried in the pool).
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("rule", ["entropy", "patience"])
def test_random_arrivals_give_exit_aware_predicts_exits(model, rule, schedule):
    params, batch = model
    if rule == "entropy":
        thresholds = safe_thresholds(entropy(forward(CONFIG, params, *batch)), np.random.default_rng(3), 2, (0.1, 0.6))
    else:
        thresholds = [1, 2]
    rows, seen = rows_of(batch), set()
    for t, threshold in enumerate(thresholds):
        reference = exit_aware_predict(CONFIG, params, *batch, threshold, rule, bucket_sizes=BUCKETS)
        engine = Engine(CONFIG, params, LENGTHS, threshold, rule, pool_size=16, bucket_sizes=BUCKETS,
                        schedule=schedule)
        for seed in (t, t + 10):  # two arrival orders through the same engine (slots reused)
            answers = drive(engine, rows, seed)
            exits = np.array([answers[i][1] for i in range(N)])
            np.testing.assert_array_equal(exits, np.asarray(reference.exit_layer))
            logits = np.stack([answers[i][0] for i in range(N)])
            np.testing.assert_allclose(logits, np.asarray(reference.logits), atol=1e-5, rtol=0)
            seen |= set(exits.tolist())
    assert len(seen) >= 2  # the thresholds exercise exits at several layers


@pytest.mark.parametrize("step_admits", [engine_lib.STEP_ADMIT_ROWS, 2 * engine_lib.ADMIT_ROWS])
def test_many_rows_admitted_at_once_give_the_same_answers(model, monkeypatch, step_admits):
    """Every row in one submit: a layer-0 step admits more rows than ADMIT_ROWS and (at 16, of 37 rows over two pools) than the
    step program embeds itself, so admit calls run first; the answers are the same."""
    monkeypatch.setattr(engine_lib, "STEP_ADMIT_ROWS", step_admits)
    params, batch = model
    reference = exit_aware_predict(CONFIG, params, *batch, 0.3, "entropy", bucket_sizes=BUCKETS)
    engine = Engine(CONFIG, params, LENGTHS, 0.3, "entropy", pool_size=64, bucket_sizes=BUCKETS)
    answers = {}
    engine.submit(rows_of(batch), [lambda logits, layer, i=i: answers.setdefault(i, (np.array(logits), layer))
                                   for i in range(N)])
    while engine.step():
        pass
    np.testing.assert_array_equal([answers[i][1] for i in range(N)], np.asarray(reference.exit_layer))
    np.testing.assert_allclose(np.stack([answers[i][0] for i in range(N)]), np.asarray(reference.logits),
                               atol=1e-5, rtol=0)


def test_a_row_submitted_while_others_are_deep_starts_on_the_next_step(model):
    params, batch = model
    rows = rows_of(batch)
    # Full depth; an admission budget no step here can exceed, so the outcome does not depend on how
    # fast the machine runs the steps (the budget itself is tested on a fake clock).
    engine = Engine(CONFIG, params, LENGTHS, 0.0, "entropy", pool_size=16, bucket_sizes=BUCKETS,
                    admit_budget_s=3600.0)
    answers = []
    first = engine.submit(rows[:5], [lambda logits, layer: answers.append(layer)] * 5)
    while engine.scheduler.layer_of(first[0]) != CONFIG.num_hidden_layers - 1:
        assert engine.step()
    deep = {engine.scheduler.layer_of(k) for k in first}
    (late,) = engine.submit(rows[5:6], [lambda logits, layer: answers.append(layer)])
    assert engine.scheduler.layer_of(late) is None   # waiting, not yet embedded
    engine.step()
    assert engine.scheduler.layer_of(late) == 1      # its layer 1 ran: it runs layer 2 next
    assert {engine.scheduler.layer_of(k) for k in first} == deep and not answers  # the others waited
    while engine.step():
        pass
    assert answers == [CONFIG.num_hidden_layers] * 6


def test_warm_up_compiles_everything_a_request_runs(model):
    params, batch = model
    engine = Engine(CONFIG, params, LENGTHS, 0.3, "entropy", pool_size=16, bucket_sizes=BUCKETS)
    engine.warm_up()
    admit, steps = engine._compiled()
    assert len(steps) == CONFIG.num_hidden_layers
    compiled = [admit._cache_size()] + [step._cache_size() for step in steps]
    assert min(compiled) >= len(LENGTHS)
    drive(engine, rows_of(batch), seed=1)
    assert [admit._cache_size()] + [step._cache_size() for step in steps] == compiled


def test_shadow_rows_change_no_answer_and_report_the_full_depth_label(model):
    """Every row shadowed: the answers are the unshadowed engine's, each row's full-depth label is
    reported once beside the label it was answered with, and the shadow lane waits for answers."""
    params, batch = model
    threshold = safe_thresholds(entropy(forward(CONFIG, params, *batch)), np.random.default_rng(5), 1, (0.3, 0.6))[0]
    rows = rows_of(batch)
    plain = drive(Engine(CONFIG, params, LENGTHS, threshold, "entropy", pool_size=16, bucket_sizes=BUCKETS), rows, 4)
    reports = []
    engine = Engine(CONFIG, params, LENGTHS, threshold, "entropy", pool_size=16, bucket_sizes=BUCKETS,
                    shadow_share=1.0, on_shadow=lambda *r: reports.append(r))
    shadowed = drive(engine, rows, 4)
    for i in range(N):
        assert shadowed[i][1] == plain[i][1]
        np.testing.assert_array_equal(shadowed[i][0], plain[i][0])
    assert len(reports) == N and engine.shadow_backlog() == 0
    full = np.argmax(np.asarray(forward(CONFIG, params, *batch))[-1], -1)   # the final ramp
    answered = {i: int(np.argmax(plain[i][0])) for i in range(N)}
    # Each report is (answered label, full-depth label, exit layer); rows are anonymous to the lane,
    # so compare the multisets.
    assert sorted(reports) == sorted((answered[i], int(full[i]), plain[i][1]) for i in range(N))
    assert any(exit_layer < CONFIG.num_hidden_layers for _, _, exit_layer in reports)


def test_the_shadow_share_is_drawn_with_its_seed(model):
    params, batch = model
    rows = rows_of(batch)
    drawn = []
    for seed in (0, 0, 1):
        engine = Engine(CONFIG, params, LENGTHS, 0.3, "entropy", pool_size=16, bucket_sizes=BUCKETS,
                        shadow_share=0.3, shadow_seed=seed)
        engine.submit(rows, [lambda *a: None] * len(rows))
        drawn.append(sorted(engine._shadowed))
    assert drawn[0] == drawn[1] != drawn[2] and 0 < len(drawn[0]) < len(rows)
    with pytest.raises(ValueError, match="shadow_share=1.5"):
        Engine(CONFIG, params, LENGTHS, 0.3, "entropy", pool_size=16, bucket_sizes=BUCKETS, shadow_share=1.5)


def test_the_shadow_lane_runs_only_when_no_answer_waits_for_a_step(model):
    params, batch = model
    rows = rows_of(batch)
    engine = Engine(CONFIG, params, LENGTHS, 10.0, "entropy", pool_size=16, bucket_sizes=BUCKETS,
                    shadow_share=1.0, admit_budget_s=3600.0)   # threshold 10: every row exits at layer 1
    engine.submit(rows[:1], [lambda *a: None])
    engine.step()
    assert engine.shadow_backlog() == 1   # answered at layer 1; its copy waits for the lane
    (late,) = engine.submit(rows[1:2], [lambda *a: None])
    engine.step()
    assert engine.shadow_backlog() == 2 and engine._shadow.running() == 0   # the new row's step ran first
    while engine.step():
        pass
    assert engine.shadow_backlog() == 0 and late not in engine._shadowed
