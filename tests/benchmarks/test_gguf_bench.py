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
def test_gguf_bench_section_runs(tmp_path):
    """make bench's section in quick mode: `splice compile --backend gguf` in a child process,
    llama.cpp's peers made from its file, every row a size, a perplexity and a decode speed."""
    text, figures = gguf_bench.run(quick=True, work=tmp_path)
    res = figures["threads"][1]
    assert set(res["rows"]) == {"llama.cpp Q4_0", "llama.cpp Q8_0", "splice float"}
    for row in res["rows"].values():
        assert math.isfinite(row["ppl"]) and row["bytes"] > 0 and row["best_decode_tok_s"] > 0
    assert res["rows"]["llama.cpp Q4_0"]["bytes"] < res["rows"]["splice float"]["bytes"]
    assert "## GGUF backend" in text and "| llama.cpp Q4_0 |" in text


@needs_stories
def test_gguf_bench_speed_only(tmp_path, capsys):
    """--no-ppl: sizes and decode speeds, no perplexity computed."""
    from splice.frontend import load_model

    ref = export(load_model(STORIES), tmp_path / "ref")
    out = tmp_path / "res.json"
    assert gguf_bench.main(["--no-peers", "--no-ppl", "--rounds", "1", "--splice", f"f32={ref}",
                            "--threads", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"]["f32"]
    assert row["ppl"] is None and "ppl_tokens" not in row and row["best_decode_tok_s"] > 0
    assert "| f32 | " in capsys.readouterr().out


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
