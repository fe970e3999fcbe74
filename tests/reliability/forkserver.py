"""Run `python -m splice ARGS` many times without paying for interpreter start-up and torch's import
each time: a server process imports splice's heavy dependencies once, then forks one child per
command. The child is a separate process that runs the `splice` package as __main__ with its own
argv, its stdout and stderr redirected at the file-descriptor level (so a traceback the interpreter
prints, or anything a C library writes, is captured), and the parent reports its real exit status
or the signal that ended it. What differs from a fresh `python -m splice` is only that the imports
are already done; tests that need a truly fresh process (an interrupt during import) use
subprocess directly.

A job can also be interrupted: `kill_after` seconds after the fork, or when a `kill_on` path glob
first matches (polled), the parent sends `signal`; or the child sends `signal` to itself from
inside a function (`kill_in` = "module:function", its `kill_nth` call, before the call runs or
after it returns with `kill_after_call`), which hits an exact point such as the atomic swap of an
artefact write.

Protocol: one JSON list of jobs per line on stdin; the jobs of a line run concurrently; one JSON
list of results per line on stdout. Run as `python -m tests.reliability.forkserver`.
"""

from __future__ import annotations

import atexit
import glob
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    """How a command ended: `rc` is the exit status, or minus the signal number that killed it."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.strip().splitlines() if ln.strip()]


def _prewarm() -> None:
    """Import what a compile, a run and a load import, so that forked children start warm."""
    for name in ("torch", "numpy", "onnx", "onnxruntime", "transformers", "safetensors", "gguf",
                 "splice.cli", "splice.api", "splice.recipe", "splice.frontend.hf",
                 "splice.frontend.llama2c", "splice.backends.onnx", "splice.runtime",
                 "splice.passes.infra.registry", "splice.passes.infra.instruments"):
        importlib.import_module(name)
    from splice.passes.infra.registry import registered

    registered()
    import transformers

    transformers.LlamaForCausalLM  # noqa: B018 - resolves the lazy module


def _inject_kill(spec: str, nth: int, sig: int, after: bool) -> None:
    """Wrap `module:function` so that its `nth` call (1-based) sends `sig` to this process just
    before the call runs, or just after it returned when `after`."""
    module_name, func = spec.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, func)
    calls = [0]

    def die() -> None:
        os.kill(os.getpid(), sig)
        time.sleep(0.05)  # a Python-level handler (SIGINT) raises here, inside the sleep

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            die()
        result = original(*args, **kwargs)
        if calls[0] == nth and after:
            die()
        return result

    setattr(module, func, wrapper)


def _child(job: dict, out_path: str, err_path: str) -> None:
    """In the forked child: become `python -m splice ARGV` and exit with its status."""
    code = 1
    try:
        out = os.open(out_path, os.O_WRONLY | os.O_TRUNC)
        err = os.open(err_path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.chdir(job.get("cwd") or os.getcwd())
        # Python's own Ctrl-C handler, as in a terminal: a server started in the background by a
        # non-interactive shell inherits SIGINT ignored, and the children would shrug it off
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if job.get("kill_in"):
            _inject_kill(job["kill_in"], int(job.get("kill_nth", 1)), int(job["signal"]),
                         bool(job.get("kill_after_call")))
        sys.argv = ["splice", *job["argv"]]
        try:
            runpy.run_module("splice", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except KeyboardInterrupt:
            # what the interpreter does with an uncaught KeyboardInterrupt: traceback, then die
            # by SIGINT
            traceback.print_exc()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: BLE001 - an uncaught exception, printed as Python would
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _kill_due(job: dict, t0: float) -> bool:
    """Whether the parent should now send the job's signal: `kill_after` seconds have passed, or
    a path matches `kill_on`."""
    if "signal" not in job or job.get("kill_in"):
        return False
    if "kill_after" in job and time.monotonic() - t0 >= float(job["kill_after"]):
        return True
    return bool(job.get("kill_on")) and bool(glob.glob(job["kill_on"]))


def _run_jobs(jobs: list[dict]) -> list[dict]:
    """Fork every job, then one loop (no threads, so nothing else reaps the children) polls them,
    sends due signals, and collects their statuses."""
    running = {}
    for i, job in enumerate(jobs):
        fd_out, out_path = tempfile.mkstemp(prefix="splice-out-")
        fd_err, err_path = tempfile.mkstemp(prefix="splice-err-")
        os.close(fd_out)
        os.close(fd_err)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(job, out_path, err_path)
        running[pid] = (i, job, out_path, err_path, t0)
    results: list[dict] = [{} for _ in jobs]
    signalled: set[int] = set()
    while running:
        for pid in list(running):
            i, job, out_path, err_path, t0 = running[pid]
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                texts = [Path(p).read_text(errors="replace") for p in (out_path, err_path)]
                for p in (out_path, err_path):
                    os.unlink(p)
                results[i] = {"argv": job["argv"], "rc": os.waitstatus_to_exitcode(status),
                              "stdout": texts[0], "stderr": texts[1],
                              "seconds": time.monotonic() - t0}
                del running[pid]
            elif pid not in signalled and _kill_due(job, t0):
                os.kill(pid, int(job["signal"]))
                signalled.add(pid)
        time.sleep(0.002)
    return results


def serve() -> None:
    _prewarm()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_run_jobs(json.loads(line))), flush=True)


class ForkServer:
    """Client: `run(argv, **job)` runs one command, `run_many(jobs)` several at once."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.forkserver"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT, env=env)
        self._lock = threading.Lock()
        first = self.proc.stdout.readline()
        if not first or not json.loads(first).get("ready"):
            raise RuntimeError(f"fork server did not start: {first!r}")

    def run_many(self, jobs: list[dict[str, Any]]) -> list[Result]:
        for job in jobs:
            if "signal" in job:
                job["signal"] = int(job["signal"])
        with self._lock:
            self.proc.stdin.write(json.dumps(jobs) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fork server died")
        return [Result(**r) for r in json.loads(line)]

    def run(self, argv: list[str], **job: Any) -> Result:
        return self.run_many([{"argv": [str(a) for a in argv], **job}])[0]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_SHARED: list[ForkServer] = []


def shared() -> ForkServer:
    """The test process's one server, started on first use (a few seconds of imports) and closed
    at exit; the CLI tests everywhere use it instead of a fresh interpreter per command."""
    if not _SHARED or _SHARED[0].proc.poll() is not None:
        _SHARED[:] = [ForkServer()]
        atexit.register(_SHARED[0].close)
    return _SHARED[0]


def run_splice(*args: Any, cwd: Path | str | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m splice ARGS` as a forked child of the shared server, in `cwd` (default: this
    process's), killed after `timeout` seconds; the result as subprocess.run gives it."""
    argv = [str(a) for a in args]
    r = shared().run(argv, cwd=str(cwd or os.getcwd()), kill_after=timeout,
                     signal=int(signal.SIGKILL))
    return subprocess.CompletedProcess([sys.executable, "-m", "splice", *argv], r.rc, r.stdout,
                                       r.stderr)


if __name__ == "__main__":
    serve()
