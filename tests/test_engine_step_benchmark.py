"""The engine-step benchmark (`train.benchmark_engine_step`): its JSON fields, consistent with each
other on a few steps of the tiny model (timings themselves are never asserted)."""

from benchmarks import engine_step


def test_a_few_steps_give_every_field_consistently():
    result = engine_step.run("tiny", rows=(1, 3), steps=6, length=8, pool_size=8)
    assert result["jax"] and result["threshold"] == 0.0 and result["num_layers"] == 2
    assert "load_average_before" in result and "threads" in result
    assert [c["rows"] for c in result["rows"]] == [1, 3]
    for cell in result["rows"]:
        assert set(cell["by_layer"]) == {"0", "1"}   # layer 0 (with its admission) and layer 1
        for kind in cell["by_layer"].values():
            assert kind["steps"] == 3
            for key in ("wall_us", "program_us"):
                assert 0 <= kind[key]["median"] <= kind[key]["p90"]
            assert kind["host_us"] == round(kind["wall_us"]["median"] - kind["program_us"]["median"], 1)
            assert kind["program_us"]["median"] > 0   # the program events were found in the trace
            assert all(v >= 0 for v in kind["split_us"].values())
        assert cell["host_us"] == round(cell["wall_us"] - cell["program_us"], 1)
        assert cell["wall_us"] > 0 and cell["program_us"] > 0
    assert len(engine_step.table(result).splitlines()) == 2 + len(result["rows"])


def test_the_breakdown_adds_up():
    step = {"name": engine_step.STEP_EVENT, "ts": 0, "dur": 100, "pid": 1, "tid": 1}
    call = {"name": engine_step.CALL_EVENT, "ts": 10, "dur": 60, "pid": 1, "tid": 1}
    # the program on another thread, partly after the call returned; a nested loop body inside it
    program = {"name": engine_step.PROGRAM_EVENT, "ts": 40, "dur": 40, "pid": 1, "tid": 2}
    nested = {"name": engine_step.PROGRAM_EVENT, "ts": 50, "dur": 10, "pid": 1, "tid": 2}
    # PJRT's execution inside the call, from before the program started to before the call returned
    execute = {"name": engine_step.EXECUTE_EVENT, "ts": 20, "dur": 45, "pid": 1, "tid": 1}
    (b,) = engine_step.step_breakdown([step, call, program, nested, execute])
    # in the call outside the program: 10-40; of that, inside the execution: 20-40
    assert b == {"wall": 100.0, "program": 40.0, "in_calls": 30.0, "python": 30.0, "dispatch": 10.0, "runtime": 20.0}
    (b,) = engine_step.step_breakdown([step, call, program, nested])   # a trace without the event
    assert (b["dispatch"], b["runtime"]) == (30.0, 0.0)
