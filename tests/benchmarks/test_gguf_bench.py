"""The gguf benchmark row runs (stories260K, a few windows): llama.cpp's own Q4_0 and Q8_0 peers
are made from the float file and every file gets a size, a perplexity and decode speeds."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make llama`)")

from benchmarks import gguf_bench  # noqa: E402
from splice.backends.gguf import export  # noqa: E402

from tests.paths import STORIES, WIKITEXT_TEST, needs_stories  # noqa: E402


@needs_stories
@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason="../shared/data is absent")
def test_gguf_bench_runs(tmp_path):
    from splice.frontend import load_model

    ref = export(load_model(STORIES), tmp_path / "ref")
    res = gguf_bench.run(ref, {"splice f32": ref}, tmp_path / "work", rounds=1, threads=1,
                         max_tokens=512, window=128)
    assert set(res["rows"]) == {"llama.cpp Q4_0", "llama.cpp Q8_0", "splice f32"}
    for row in res["rows"].values():
        assert math.isfinite(row["ppl"]) and row["bytes"] > 0 and row["best_decode_tok_s"] > 0
    assert res["rows"]["llama.cpp Q4_0"]["bytes"] < res["rows"]["splice f32"]["bytes"]
    assert "| llama.cpp Q4_0 |" in gguf_bench.markdown(res)


@needs_stories
@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason="../shared/data is absent")
def test_gguf_bench_accuracy_only(tmp_path, capsys):
    """--no-peers --no-speed: the splice files' size and perplexity, nothing timed."""
    from splice.evaluate import perplexity_of
    from splice.frontend import load_model

    ref = export(load_model(STORIES), tmp_path / "ref")
    out = tmp_path / "res.json"
    assert gguf_bench.main(["--no-peers", "--no-speed", "--splice", f"f32={ref}", "--threads",
                            "1", "--max-tokens", "256", "--window", "128", "--out",
                            str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["rows"]) == {"f32"} and res["rounds"] == 0
    row = res["rows"]["f32"]
    assert row["decode_tok_s"] == [] and "best_decode_tok_s" not in row
    assert row["ppl"] == pytest.approx(perplexity_of(ref, WIKITEXT_TEST, max_tokens=256,
                                                     window=128)["ppl"])
    assert "| f32 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gguf_bench.main(["--no-speed"])
