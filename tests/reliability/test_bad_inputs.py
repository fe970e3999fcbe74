"""Every case of the bad-input corpus (corpus.py) through the CLI and through the Python API.

CLI: exit code 2, exactly one line on stderr naming the problem (every needle of the case), no
traceback, the output directory absent afterwards and every input the command names unchanged.
API: splice.compile / splice.runtime.load / splice.evaluate raise an InputError holding the same
needles, on one line, and a pre-existing artefact at `out` stays byte-identical. A case marked
`may_succeed` (bit flips in weights) may also succeed; it must never be exit 1 or a traceback.

The CLI cases run in forked children of a warm server (forkserver.py), two at a time; a handful
also run as fresh `python -m splice` processes (test_fresh_processes) to show that nothing differs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from splice.errors import InputError
from tests.reliability.conftest import TRIED, tree_digest
from tests.reliability.corpus import CASES, Case, placeholders, resolve

IDS = [c.id for c in CASES]
assert len(set(IDS)) == len(IDS), "corpus case ids must be unique"


def _skip_reason(c: Case) -> str | None:
    if not c.requires:
        return None
    from splice.passes.infra.registry import pass_settings, registered

    name, *setting = c.requires
    cls = registered().get(name)
    if cls is None:
        return f"pass {name!r} is not registered yet"
    if setting and setting[0] not in {s.name for s in pass_settings(cls)}:
        return f"pass {name!r} has no setting {setting[0]!r}"
    return None


def _named_inputs(c: Case, paths: dict[str, Path]) -> dict[str, Path]:
    return {n: paths[n] for n in placeholders(c) if n in paths}


def _snapshot(named: dict[str, Path]) -> dict[str, dict]:
    return {n: tree_digest(p) for n, p in named.items()}


def _strays(out: Path) -> list[str]:
    """What the command left beside `out` in its parent, which holds nothing else (a lock, a
    temporary directory, a scratch folder of --layerwise)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.fixture(scope="module")
def work(bad_inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "recipes").mkdir()
    return root


@pytest.fixture(scope="module")
def cli_results(bad_inputs, work, forkserver, request):
    """Every runnable case whose test_cli is selected, through the CLI, two at a time:
    {id: (result, out, before, after)}."""
    selected = {item.callspec.params["c"].id for item in request.session.items
                if item.originalname == "test_cli" and hasattr(item, "callspec")}
    pending = []
    for c in CASES:
        if _skip_reason(c) or c.id not in selected:
            continue
        out = work / "cli" / c.id / "out"
        out.parent.mkdir(parents=True)
        argv = resolve(c, bad_inputs, out, work / "recipes")
        pending.append((c, argv, out, _snapshot(_named_inputs(c, bad_inputs))))
    results = {}
    for i in range(0, len(pending), 2):
        batch = pending[i:i + 2]
        runs = forkserver.run_many([{"argv": argv} for _, argv, _, _ in batch])
        for (c, argv, out, before), r in zip(batch, runs):
            results[c.id] = (r, out, before, _snapshot(_named_inputs(c, bad_inputs)))
    return results


def _check_line(line: str, c: Case) -> None:
    for needle in c.needles:
        assert needle.lower() in line.lower(), f"{c.id}: {needle!r} not in {line!r}"


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_cli(c: Case, cli_results):
    reason = _skip_reason(c)
    if reason:
        pytest.skip(reason)
    r, out, before, after = cli_results[c.id]
    assert "Traceback" not in r.stderr, r.stderr
    if c.may_succeed and r.rc == 0:
        TRIED["bad inputs (CLI)"][c.category + " (loaded)"] += 1
        return
    assert r.rc == 2, f"{c.id}: exit {r.rc}\n{r.stderr}"
    assert len(r.lines) == 1, f"{c.id}: stderr is not one line:\n{r.stderr}"
    assert r.lines[0].startswith("splice: error: ")
    _check_line(r.lines[0], c)
    assert not os.path.lexists(out), f"{c.id}: {out} was written"
    assert not _strays(out)
    assert before == after, f"{c.id}: an input was changed"
    TRIED["bad inputs (CLI)"][c.category] += 1


def call_api(argv: list[str]) -> None:
    """What the CLI command does, through the Python API instead of the command line."""
    import splice
    from splice.cli import build_parser

    from splice.cli_args import export_options
    from splice.passes.infra.instruments import DumpInstrument

    a = build_parser().parse_args(argv)
    if a.command == "compile":
        splice.compile(a.model, a.recipe, a.target, a.out,
                       calibration=Path(a.calib) if a.calib else None, seed=a.seed,
                       memory_limit=None if a.memory_limit is None else a.memory_limit * 1e9,
                       instruments=[DumpInstrument(a.dump_ir)] if a.dump_ir is not None else (),
                       export_options=export_options(a), layerwise=a.layerwise)
    elif a.command == "run":
        art = splice.load(a.artefact, threads=a.threads)
        art.generate(a.prompt, max_new_tokens=a.max_new_tokens, greedy=a.temperature == 0,
                     temperature=a.temperature or 1.0, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                     lookahead=a.lookahead)
    elif a.command == "eval":
        from splice.evaluate import perplexity_of

        perplexity_of(a.model, Path(a.text), max_tokens=a.max_tokens, window=a.window)
    elif a.command == "inspect":
        from splice.runtime import verify_artefact

        verify_artefact(a.model)
    else:
        raise AssertionError(f"no API form for {a.command}")


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_api(c: Case, bad_inputs, work, tmp_path):
    reason = _skip_reason(c) or ("an argument of the CLI only" if c.cli_only else None)
    if reason:
        pytest.skip(reason)
    # through the API, `out` already holds an artefact, which a failure must leave as it was
    out = tmp_path / "out"
    shutil.copytree(bad_inputs["artefact"], out)
    named = _named_inputs(c, bad_inputs)
    before, out_before = _snapshot(named), tree_digest(out)
    argv = resolve(c, bad_inputs, out, work / "recipes")
    try:
        call_api(argv)
    except InputError as e:
        text = str(e)
        assert "\n" not in text.strip(), f"{c.id}: message is not one line:\n{text}"
        _check_line(text, c)
    else:
        assert c.may_succeed, f"{c.id}: no InputError"
        TRIED["bad inputs (API)"][c.category + " (loaded)"] += 1
        return
    assert tree_digest(out) == out_before, f"{c.id}: the previous artefact was changed"
    assert not _strays(out)
    assert _snapshot(named) == before, f"{c.id}: an input was changed"
    TRIED["bad inputs (API)"][c.category] += 1


# one case per category as a fresh `python -m splice` process: the fork server changes nothing
FRESH = ["l2c_half", "hf_truncated_st", "unknown_pass", "calib_short", "longer_than_context",
         "art_changed_weights"]


def test_fresh_processes(bad_inputs, work):
    by_id = {c.id: c for c in CASES}
    procs = []
    for cid in FRESH:
        out = work / "fresh" / cid / "out"
        out.parent.mkdir(parents=True)
        argv = resolve(by_id[cid], bad_inputs, out, work / "recipes")
        procs.append((cid, out, subprocess.Popen(
            [sys.executable, "-m", "splice", *argv], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)))
        if len(procs) % 3 == 0:      # three at a time on a small machine
            procs[-3][2].wait()
    for cid, out, p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and len(err.strip().splitlines()) == 1, (cid, p.returncode, err)
        _check_line(err, by_id[cid])
        assert not os.path.lexists(out)
        TRIED["bad inputs (fresh process)"][by_id[cid].category] += 1


def test_debug_shows_the_traceback(bad_inputs, work, forkserver):
    c = next(c for c in CASES if c.id == "l2c_half")
    r = forkserver.run(["--debug", *resolve(c, bad_inputs, work / "dbg", work / "recipes")])
    assert r.rc == 1 and "Traceback" in r.stderr and "FrontendError" in r.stderr
