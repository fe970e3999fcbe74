"""PassManager and the timing / verify / dump instruments."""

from __future__ import annotations

import json

import pytest

from splice.errors import InputError
from splice.ir import parse_graph
from splice.passes import (DumpInstrument, FixedPointError, Instrument, PassCheckError,
                           PassContext, PassError, PassFailure, PassInputFailure, PassManager,
                           TimingInstrument, VerifyInstrument)
from splice.passes.fold_norms import FoldNormsPass
from tests.passes.models import hand_built, with_settings
from tests.passes.toys import BreakPass, CountdownPass, FailPass, LogPass, NotAResultPass


class Recorder(Instrument):
    """Logs every hook call into a shared list."""

    def __init__(self, tag: str, log: list):
        self.tag, self.log = tag, log

    def run_begin(self, module, ctx):
        self.log.append((self.tag, "run_begin"))

    def before_pass(self, module, pass_, ctx):
        self.log.append((self.tag, "before", pass_.name))

    def after_pass(self, module, pass_, ctx, result, record):
        self.log.append((self.tag, "after", pass_.name, record["modified"]))
        record[self.tag] = {"seen": True}

    def run_end(self, module, ctx, report):
        self.log.append((self.tag, "run_end", len(report)))


def test_runs_passes_in_list_order_and_reports_each():
    ctx = PassContext()
    module = with_settings(hand_built(), countdown=1)
    passes = [LogPass("first"), CountdownPass(), LogPass("second"), FoldNormsPass()]
    out, report = PassManager(passes).run(module, ctx)
    assert out is module
    assert ctx.options["log"] == ["first", "second"]
    assert [r["step"] for r in report] == [0, 1, 2, 3]
    assert [r["name"] for r in report] == ["log", "countdown", "log", "fold_norms"]
    assert [r["modified"] for r in report] == [False, True, False, True]
    assert report[0]["settings"] == {"label": "first"}
    assert report[0]["report"] == {"label": "first"}
    assert report[3]["settings"] == {"untie": True, "max_gain": 2.5, "probe_tokens": 128}
    assert report[3]["report"]["folded"] == ["layers.0.attn_norm", "final_norm"]
    for r in report:
        assert set(r) >= {"step", "name", "settings", "modified", "time_s", "report", "verify"}
        assert r["time_s"] >= 0
    assert json.loads(json.dumps(report)) == report


def test_empty_pass_list_returns_module_and_empty_report():
    module = hand_built()
    assert PassManager([]).run(module) == (module, [])


@pytest.mark.parametrize("bad_input", [False, True])
def test_error_names_failing_pass_and_the_passes_before_it(bad_input):
    module = with_settings(hand_built(), countdown=5)
    passes = [LogPass("a"), CountdownPass(), FailPass(bad_input=bad_input), LogPass("never")]
    ctx = PassContext()
    with pytest.raises(PassFailure) as info:
        PassManager(passes).run(module, ctx)
    err = info.value
    assert "'fail'" in str(err) and "step 2" in str(err)
    assert "ran before it: log, countdown" in str(err)
    assert err.pass_name == "fail" and err.step == 2 and err.ran_before == ("log", "countdown")
    assert ctx.options["log"] == ["a"]
    if bad_input:
        # bad input stays bad input, so the CLI exits 2
        assert isinstance(err, PassInputFailure) and isinstance(err, PassError)
        assert isinstance(err, InputError)
        assert isinstance(err.__cause__, PassError) and "layer 99" in str(err)
    else:
        assert not isinstance(err, InputError)
        assert isinstance(err.__cause__, RuntimeError) and "boom" in str(err)


def test_fixed_point_repeats_until_nothing_changes():
    module = with_settings(hand_built(), countdown=3)
    _, report = PassManager([CountdownPass(), LogPass()], fixed_point=True).run(module)
    assert module.config.extra["countdown"] == 0
    modified = [(r["name"], r["modified"]) for r in report]
    assert modified == [("countdown", True), ("log", False)] * 3 + [("countdown", False)]


def test_fixed_point_off_runs_the_list_once():
    module = with_settings(hand_built(), countdown=3)
    _, report = PassManager([CountdownPass(), LogPass()]).run(module)
    assert len(report) == 2 and module.config.extra["countdown"] == 2


def test_fixed_point_step_cap_raises_naming_the_passes_still_modifying():
    module = with_settings(hand_built(), countdown=100)
    manager = PassManager([CountdownPass(), LogPass()], fixed_point=True, max_steps=7)
    with pytest.raises(FixedPointError, match=r"after 7 pass runs.*countdown"):
        manager.run(module)
    assert module.config.extra["countdown"] == 96
    with pytest.raises(PassError, match="max_steps"):
        PassManager([LogPass()], max_steps=0)


def test_instruments_are_called_in_order_around_each_pass():
    log: list = []
    module = with_settings(hand_built(), countdown=1)
    _, report = PassManager([CountdownPass(), LogPass()],
                            [Recorder("A", log), Recorder("B", log)]).run(module)
    assert log == [
        ("A", "run_begin"), ("B", "run_begin"),
        ("A", "before", "countdown"), ("B", "before", "countdown"),
        ("A", "after", "countdown", True), ("B", "after", "countdown", True),
        ("A", "before", "log"), ("B", "before", "log"),
        ("A", "after", "log", False), ("B", "after", "log", False),
        ("A", "run_end", 2), ("B", "run_end", 2),
    ]
    assert report[0]["A"] == {"seen": True} and report[1]["B"] == {"seen": True}


def test_dump_writes_input_and_only_modified_passes(tmp_path):
    module = with_settings(hand_built(), countdown=1)
    passes = [LogPass(), FoldNormsPass(), CountdownPass(), FoldNormsPass()]
    _, report = PassManager(passes, [DumpInstrument(tmp_path / "dumps")]).run(module)
    files = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert files == ["000_input.txt", "002_fold_norms.txt", "003_countdown.txt"]
    assert report[1]["dump"].endswith("002_fold_norms.txt") and "dump" not in report[3]
    before = (tmp_path / "dumps" / "000_input.txt").read_text()
    after = (tmp_path / "dumps" / "002_fold_norms.txt").read_text()
    assert "n1.weight" in before and "n1.weight" not in after
    assert str(parse_graph(after)) == after


def test_timing_instrument_records_time_and_memory():
    _, report = PassManager([FoldNormsPass()], [TimingInstrument()]).run(hand_built())
    timing = report[0]["timing"]
    assert timing["wall_s"] >= 0 and timing["cpu_s"] >= 0
    assert timing["peak_rss_mb"] > 0 and timing["peak_rss_delta_mb"] >= 0


def test_verify_instrument_names_the_pass_that_broke_the_module():
    with pytest.raises(PassFailure, match=r"VerifyInstrument rejected.*pass 'break'") as info:
        PassManager([LogPass(), BreakPass()], [VerifyInstrument()]).run(hand_built())
    assert "ran before it: log" in str(info.value)
    assert isinstance(info.value.__cause__, PassCheckError)


def test_suite_fixture_verifies_direct_pass_calls_and_every_manager():
    # tests/conftest.py: rule 13, the verifier runs after every pass even when a test forgets it
    with pytest.raises(PassCheckError, match="after pass 'break'"):
        BreakPass()(hand_built())
    with pytest.raises(PassFailure, match="VerifyInstrument"):
        PassManager([BreakPass()]).run(hand_built())


def test_rejects_things_that_are_not_passes_or_results():
    with pytest.raises(PassError, match="item 1 is str"):
        PassManager([LogPass(), "fold_norms"])
    with pytest.raises(PassError, match="not an Instrument"):
        PassManager([LogPass()], [object()])
    with pytest.raises(PassFailure, match="returned Module; a pass returns PassResult"):
        PassManager([NotAResultPass()]).run(hand_built())


def test_one_manager_runs_twice_on_two_modules():
    manager = PassManager([FoldNormsPass()], [TimingInstrument()])
    a, b = hand_built(seed=1), hand_built(seed=2)
    _, ra = manager.run(a)
    _, rb = manager.run(b)
    assert ra[0]["modified"] and rb[0]["modified"]
    assert str(a.graph) == str(b.graph)
    assert not (a.weights["a.weight"] == b.weights["a.weight"]).all()
