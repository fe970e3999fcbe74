"""`make bench`: run the benchmark sections and write BENCHMARKS.md.

    python -m benchmarks.run            # full figures on SmolLM2-135M (minutes)
    python -m benchmarks.run --quick    # stories260K, small sizes: checks that the benchmarks run
    python -m benchmarks.run --only foundation --out BENCHMARKS.md

Speed figures are from this machine in this run; compare the ratios between engines measured in
the same run, not absolutes across machines.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("presets", "gguf_bench", "foundation", "prune_patch", "tvm_bench", "tvm_bandwidth",
            "npu", "scale", "hadamard", "onnx_speed", "models")


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run")
    ap.add_argument("--quick", action="store_true", help="small models and sizes (the test suite)")
    ap.add_argument("--only", choices=SECTIONS, action="append")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--json", default=None, help="also write the raw figures as JSON")
    a = ap.parse_args(argv)
    parts = [f"# splice benchmarks\n\nMachine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. "
             f"Mode: {'quick' if a.quick else 'full'}.\n"]
    raw = {}
    for name in a.only or SECTIONS:
        mod = importlib.import_module(f"benchmarks.{name}")
        t0 = time.perf_counter()
        text, figures = mod.run(quick=a.quick)
        raw[name] = figures
        parts.append(text + f"\n_{name}: {time.perf_counter() - t0:.0f} s_\n")
        print(text, flush=True)
    Path(a.out).write_text("\n".join(parts))
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=2, default=float))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
