"""Interrupted work loses nothing.

A compile of stories260K into a directory that already holds an artefact is interrupted (SIGINT,
as Ctrl-C sends, and SIGKILL, which nothing can catch) at many moments:
  * after fixed delays, in warm forked children (forkserver.py: loading, passes, lowering and
    writing all happen within about a second) and in fresh `python -m splice` processes (which
    spend their first seconds importing torch);
  * when the writer's hidden temporary directory appears, when the weights are being written into
    it, and when its manifest exists (polled every 2 ms);
  * at exact points inside the writer: the child signals itself just before the atomic exchange,
    before it deletes the previous artefact, and before the k-th fsync.
Afterwards the directory holds a whole artefact, the previous one (its pinned manifest hash and
every file hash check) or the new one (loads, hashes check), never a mix, never nothing. SIGINT
exits 130 with "splice: interrupted" and no traceback, and leaves no temporary directory; what
SIGKILL leaves (a hidden .NAME.tmp-* directory) the next write into the same place deletes.
Two or three compiles into one directory at once serialise on the writer's lock.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splice.runtime import load, verify_artefact
from splice.runtime.manifest import MANIFEST, sha256_file
from tests.reliability.conftest import TRIED

DELAYS = (0.05, 0.2, 0.4, 0.6, 0.9, 1.3, 2.0)


@pytest.fixture(scope="module")
def previous(bases) -> tuple[Path, str]:
    """An artefact compiled with recipe "none" (so a fold_norms compile writes different files)
    and the sha256 of its manifest."""
    import splice

    path = splice.compile(bases["stories"], "none", "cpu", bases["artefact"].parent / "previous",
                          load=False)
    return path, sha256_file(path / MANIFEST)


def _fresh_target(previous: tuple[Path, str], root: Path, name: str) -> Path:
    out = root / name / "art"
    out.parent.mkdir(parents=True)
    shutil.copytree(previous[0], out)
    return out


def strays(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def check_whole(out: Path, pin: str | None) -> str:
    """`out` is the previous artefact (its manifest hash is `pin`) or a complete new one;
    returns which."""
    assert out.is_dir(), f"{out} is gone: the previous artefact was lost"
    manifest = verify_artefact(out)          # every listed file present with its hash, no extras
    if pin is not None and sha256_file(out / MANIFEST) == pin:
        return "previous"
    assert manifest["recipe"]["name"] == "fold_norms"
    art = load(out)
    assert len(art.generate_ids([1, 2, 3], max_new_tokens=2).ids) == 2
    return "new"


def _compile_argv(stories: Path, out: Path) -> list[str]:
    return ["compile", str(stories), "--recipe", "fold_norms", "--out", str(out)]


def _check_signal_result(r, sig: int, out: Path) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    if sig == signal.SIGKILL:
        assert r.rc in (0, -signal.SIGKILL), (r.rc, r.stderr)
        return
    # a SIGINT that lands after the compile finished finds nothing to interrupt
    assert r.rc in (0, 130), (r.rc, r.stderr)
    if r.rc == 130:
        assert r.lines[-1] == "splice: interrupted", r.stderr
    assert not strays(out), f"SIGINT left {strays(out)}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_after_delays(sig, bases, previous, forkserver, tmp_path):
    jobs, outs = [], []
    for delay in DELAYS:
        out = _fresh_target(previous, tmp_path, f"d{delay}")
        outs.append(out)
        jobs.append({"argv": _compile_argv(bases["stories"], out), "signal": sig,
                     "kill_after": delay})
    seen = []
    for i in range(0, len(jobs), 2):          # two at a time on a small machine
        for r, out in zip(forkserver.run_many(jobs[i:i + 2]), outs[i:i + 2]):
            _check_signal_result(r, sig, out)
            seen.append(check_whole(out, previous[1]))
            TRIED["kill points"][f"{signal.Signals(sig).name} after a delay"] += 1
    # the kills landed on both sides of the swap, or the delays no longer cover a compile
    assert "previous" in seen


# (what appears, polled) -> the moment it marks
POLLED = {".art.tmp-*": "the writer's temporary directory appears",
          ".art.tmp-*/model.onnx.data": "the weights are being written",
          ".art.tmp-*/genai_config.json": "the model is written, the other files are next",
          ".art.tmp-*/manifest.json": "the manifest is written, the swap is next"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("pattern", list(POLLED), ids=["tmpdir", "weights", "model", "manifest"])
def test_killed_while_writing(sig, pattern, bases, previous, forkserver, tmp_path):
    out = _fresh_target(previous, tmp_path, "w")
    r = forkserver.run(_compile_argv(bases["stories"], out), signal=sig,
                       kill_on=str(out.parent / pattern))
    _check_signal_result(r, sig, out)
    check_whole(out, previous[1])
    TRIED["kill points"][f"{signal.Signals(sig).name} when {POLLED[pattern]}"] += 1


# exact points inside backends/artefact.py: (function, call number) -> the moment
# (function, call number, after the call) -> the moment
INJECTED = {("splice.backends.artefact:_exchange", 1, False): "just before the atomic exchange",
            ("splice.backends.artefact:_exchange", 1, True):
                "just after the exchange, before the previous artefact is deleted",
            ("os:fsync", 2, False): "while the files are hashed and fsynced",
            ("splice.backends.artefact:_fsync_dir", 1, False):
                "after the manifest, before the swap"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("point", list(INJECTED), ids=["exchange", "exchanged", "fsync", "dirsync"])
def test_killed_at_exact_points(sig, point, bases, previous, forkserver, tmp_path):
    out = _fresh_target(previous, tmp_path, "x")
    func, nth, after = point
    r = forkserver.run(_compile_argv(bases["stories"], out), signal=sig, kill_in=func,
                       kill_nth=nth, kill_after_call=after)
    assert r.rc == (130 if sig == signal.SIGINT else -signal.SIGKILL), (r.rc, r.stderr)
    _check_signal_result(r, sig, out)
    state = check_whole(out, previous[1])
    assert state == ("new" if after else "previous")
    TRIED["kill points"][f"{signal.Signals(sig).name} {INJECTED[point]}"] += 1
    if sig == signal.SIGKILL:
        left = strays(out)
        assert left and all(".art.tmp-" in name for name in left), left
        # the next write into the same place deletes what the killed one left
        r2 = forkserver.run(_compile_argv(bases["stories"], out))
        assert r2.rc == 0, r2.stderr
        assert not strays(out) and check_whole(out, None) == "new"


def test_clean_compile_leaves_only_the_artefact_and_its_lock(bases, forkserver, tmp_path):
    out = tmp_path / "art"
    for _ in range(2):      # a first write and a replacement
        r = forkserver.run(_compile_argv(bases["stories"], out))
        assert r.rc == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    check_whole(out, None)


def test_concurrent_compiles_into_one_directory(bases, forkserver, tmp_path):
    out = tmp_path / "art"
    argv = _compile_argv(bases["stories"], out)
    none = ["compile", str(bases["stories"]), "--recipe", "none", "--out", str(out)]
    results = forkserver.run_many([{"argv": argv}, {"argv": none}, {"argv": argv}])
    assert [r.rc for r in results] == [0, 0, 0], [r.stderr for r in results]
    manifest = verify_artefact(out)
    assert manifest["recipe"]["name"] in ("fold_norms", "none")
    load(out).generate_ids([1, 2, 3], max_new_tokens=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    TRIED["kill points"]["concurrent compiles (3 into one directory)"] += 1


def test_fresh_processes_interrupted(bases, previous, tmp_path):
    """Real `python -m splice` processes, interrupted during their start-up and imports too."""
    plan = [(signal.SIGINT, 1.0), (signal.SIGINT, 2.0), (signal.SIGINT, 2.5),
            (signal.SIGINT, 4.0), (signal.SIGKILL, 3.0)]
    procs = []
    for sig, delay in plan:
        out = _fresh_target(previous, tmp_path, f"{sig.name}{delay}")
        argv = [sys.executable, "-m", "splice", *_compile_argv(bases["stories"], out)]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((sig, delay, out, p, time.monotonic()))
    for sig, delay, out, p, t0 in sorted(procs, key=lambda x: x[1]):
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        p.send_signal(sig)
    for sig, delay, out, p, _ in procs:
        _, err = p.communicate(timeout=300)
        assert "Traceback" not in err, err
        state = check_whole(out, previous[1])
        if sig == signal.SIGINT:
            # after the work is done, a Ctrl-C can still land in the interpreter's shutdown,
            # which then ends by the signal: the artefact is new and whole by then
            assert p.returncode in (0, 130) or (p.returncode == -signal.SIGINT and state == "new"), \
                (delay, p.returncode, err)
            if p.returncode == 130:
                assert err.strip().splitlines()[-1] == "splice: interrupted"
            assert not strays(out)
        else:
            assert p.returncode in (0, -signal.SIGKILL)
        TRIED["kill points"][f"{sig.name} fresh process after {delay} s"] += 1


@pytest.mark.parametrize("wrap", ["ImportError", "FrontendError"])
def test_an_interrupted_import_is_an_interruption(wrap, monkeypatch, capsys):
    """Ctrl-C while a C extension initialises reaches Python as that module's ImportError
    ("initialization failed", seen with onnxruntime), possibly wrapped again by a frontend; the
    CLI still reports an interruption, not a bug or bad input."""
    from splice import cli
    from splice.errors import FrontendError

    def interrupted_import(a):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            try:
                raise ImportError("initialization failed") from e
            except ImportError as inner:
                if wrap == "ImportError":
                    raise
                raise FrontendError("transformers cannot load x") from inner

    monkeypatch.setattr(cli, "cmd_passes", interrupted_import)
    assert cli.main(["passes"]) == 130
    assert capsys.readouterr().err.strip() == "splice: interrupted"


def test_a_ctrl_c_inside_a_finalizer_interrupts_after_it(monkeypatch, capsys):
    """A KeyboardInterrupt raised inside a `__del__` is printed with a traceback and dropped by
    Python (seen when a Ctrl-C hit the regex module's Group.__del__ early in a compile): the
    CLI's handler raises it again once the finalizer has returned, and the command ends as an
    interruption with one line."""
    from splice import cli

    class Finalized:
        def __del__(self):
            cli._on_sigint(signal.SIGINT, sys._getframe())  # what the signal would call

    def work(a):
        Finalized()  # dropped at once: its __del__ runs here
        time.sleep(5)  # the re-raised interrupt ends this long before 5 s
        return 0

    monkeypatch.setattr(cli, "cmd_passes", work)
    t = time.perf_counter()
    assert cli.main(["passes"]) == 130
    assert time.perf_counter() - t < 2
    err = capsys.readouterr().err
    assert err.strip() == "splice: interrupted" and "Traceback" not in err
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and not cli._alarm_before
