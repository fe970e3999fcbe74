"""The Hadamard lowering benchmark runs (quick mode: three widths): every strategy gets a time
for every width and token count, and the `chosen` column is the size rule's pick."""

from __future__ import annotations

from benchmarks.hadamard import TOKENS, run
from splice.backends.onnx.hadamard import STRATEGIES, choose_strategy


def test_hadamard_quick_runs():
    text, figures = run(quick=True)
    rows = figures["rows"]
    assert [(r["width"], r["tokens"]) for r in rows] == [(w, t) for w in (16, 576, 1536)
                                                         for t in TOKENS]
    for r in rows:
        assert set(r["us"]) == set(STRATEGIES) and all(v > 0 for v in r["us"].values())
        assert r["chosen"] == choose_strategy(r["width"])
        assert f"| {r['width']} | {r['tokens']} |" in text
