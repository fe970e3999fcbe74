"""Gemma 3 end to end (issue 27). A tiny random Gemma 3 (transformers' Gemma3ForCausalLM, with
pre-norm scales spread as Gemma 3 270M's are: most near 1-2, a few channels 40x) through fold_norms,
rotate (R1 rotated online after the sandwich post-norms, R2, R4), center_inputs and W4 g32 to an
ONNX artefact: the artefact must compute what the interpreter computes for the quantized module (a
broken lowering of the online Hadamards, the centering or the int4 weights fails this), and the
quantized model must stay close to the float one (a broken quantizer or rotation fails that). The
same with Gemma 3 270M's massive activation planted (one residual channel far above the others,
scaled down by every pre-norm): fold_norms leaves those norms and rotate_inputs rotates their
readers online, and W4 stays near float where folding every norm does not. The evaluation protocol
gives a BOS to every window exactly when the tokenizer adds one. On the real Gemma 3 270M (marked
`real`: `make test-real` runs it, `make test` does not; skips without `make gemma`): the rotation
is exact, and W4 g128 RTN after fold_norms, rotate_inputs and rotate stays within 2x of float."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers as T

import splice
from splice.api import run_passes
from splice.evaluate import perplexity, window_bos
from splice.frontend.hf import from_transformers
from splice.ir import run_logits
from splice.recipe import Recipe, builtin_names
from splice.runtime.tokenizer import load_tokenizer
from tests.paths import GEMMA3, WIKITEXT_TEST, needs_gemma3
from tests.tiny import BOS, byte_tokenizer

W4_ROTATED = Recipe("w4_rotated_gemma", (
    ("fold_norms", {}), ("rotate", {}), ("center_inputs", {}),
    ("quantize_weights", {"method": "rtn", "bits": 4, "group_size": 32})), "issue 27's check")


def tiny_gemma3(seed: int = 0) -> torch.nn.Module:
    cfg = T.Gemma3TextConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=128, attn_implementation="eager")
    model = T.Gemma3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "input_layernorm" in name or "pre_feedforward" in name:
                gamma = 1 + torch.rand(p.shape, generator=g)
                gamma[torch.randperm(p.numel(), generator=g)[:4]] *= 40
                p.copy_(gamma - 1)  # Gemma stores w of (1 + w)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            elif p.dim() == 2:
                p.normal_(0, 1 / math.sqrt(p.shape[1]), generator=g)
    return model


def kl_top1(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    lp, lq = ref.double().log_softmax(-1), out.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return kl, (ref.argmax(-1) == out.argmax(-1)).double().mean().item()


def test_tiny_gemma3_w4_rotated_artefact_close_to_float(tmp_path):
    module = from_transformers(tiny_gemma3())
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 256, (4, 32), generator=g)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    ref = run_logits(module, ids, torch.float64)["logits"]
    # MatMulNBits in float32 (accuracy_level 0): its default int8 activations move this model's
    # logits by ~8% of the largest (1% with unit norm scales), which would hide a lowering bug
    art = splice.compile(module.clone(), W4_ROTATED, "cpu", tmp_path / "a", calibration=calib,
                         export_options={"accuracy_level": 0})
    report = json.loads((tmp_path / "a" / "manifest.json").read_text())["report"]
    r1 = next(p for p in report["passes"] if p["name"] == "rotate")["report"]["r1"]
    assert len(r1["online_post_norms"]) == 6  # every post-norm: R1 covers the whole network
    # the lowering: the artefact computes the quantized module (rotated online, int4 weights)
    quantized = run_passes(module.clone(), W4_ROTATED, calibration=calib)[0]
    expect = run_logits(quantized, ids, torch.float64)["logits"]
    got = torch.from_numpy(art.logits(ids.numpy())[0]).double()
    assert ((got - expect).abs().max() / expect.abs().max()).item() <= 1e-4
    # the quantizer and the rotation: close to the float model
    kl, top1 = kl_top1(ref, expect)
    assert kl <= 0.1 and top1 >= 0.85, (kl, top1)


def test_window_bos_follows_the_tokenizer():
    plain = load_tokenizer("hf", byte_tokenizer().files)
    assert window_bos(plain) is None  # SmolLM2's kind: adds no BOS, none per window
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(plain._tok.to_str())
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", BOS)])
    gemma_like = load_tokenizer("hf", {**byte_tokenizer().files,
                                       "tokenizer.json": tok.to_str().encode()})
    assert gemma_like.encode("ab", bos=True) == [BOS, 97, 98]
    assert window_bos(gemma_like) == BOS
    seen = []

    def logits_fn(ids: np.ndarray) -> np.ndarray:
        seen.append(ids[0].tolist())
        return np.zeros((1, ids.shape[1], 258), dtype=np.float32)
    r = perplexity(logits_fn, list(range(10, 30)), window=8, bos=BOS)
    assert [w[0] for w in seen] == [BOS, BOS] and seen[1][1:] == list(range(18, 25))
    assert r["protocol"] == "2 windows of 8 tokens, BOS 256 before each window, every token " \
                           "scored, 16 tokens scored"
    assert r["ppl"] == pytest.approx(258.0)
    r = perplexity(logits_fn, list(range(10, 30)), window=8)
    assert r["protocol"].endswith("no BOS, each window's first token context only, 14 tokens "
                                  "scored")


@pytest.mark.real
@needs_gemma3
def test_gemma3_270m_rotation_exact_and_w4_near_float():
    """The real model on the reference interpreter, 2 x 256 WikiText-2 test tokens with a BOS per
    window: fold_norms of every norm + rotate (R1 online after the 36 post-norms, R2, R4) leaves
    perplexity where it was; W4 g128 RTN after fold_norms (which leaves 35 of the 36 pre-norms:
    massive activations), rotate_inputs and rotate stays within 2x of float (1,024 tokens, 512 a
    window: 19.9 float; before issue 27's fix, fold + W4 gave 5e5 and fold + R1 + W4 7e11)."""
    from splice.frontend import load_model
    from splice.frontend.text import module_tokenizer, read_text

    module = load_model(str(GEMMA3))
    tok = module_tokenizer(module)
    ids = list(tok.encode(read_text(WIKITEXT_TEST)))[:512]
    bos = window_bos(tok)
    assert bos == 2

    def ppl(m):
        def fn(x):
            with torch.no_grad():
                return run_logits(m, torch.from_numpy(x))["logits"].numpy()
        return perplexity(fn, ids, window=256, bos=bos)["ppl"]
    base = ppl(module)
    w4 = Recipe("w4_rtn", (("fold_norms", {}), ("rotate_inputs", {}), ("rotate", {}), (
        "quantize_weights", {"method": "rtn", "bits": 4, "group_size": 128,
                             "output_error": False})), "")
    assert ppl(run_passes(module.clone(), w4)[0]) <= base * 2.0, base
    rotated = run_passes(module, Recipe("rotate", (("fold_norms", {"max_gain": 0}),
                                                   ("rotate", {})), ""))[0]
    assert ppl(rotated) == pytest.approx(base, rel=1e-3)


W4_GEMMA = Recipe("w4_gemma", (
    ("fold_norms", {}), ("rotate_inputs", {}), ("rotate", {}),
    ("quantize_weights", {"method": "rtn", "bits": 4, "group_size": 32})), "issue 27's fix")


def massive_gemma3(seed: int = 0) -> torch.nn.Module:
    """tiny_gemma3 with Gemma 3 270M's massive activation: one residual channel far above the
    others on every token, which every pre-norm scales down to 0.02 (the others 1-2, a few 40x)."""
    model = tiny_gemma3(seed)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 7] = 30 * emb.abs().max()
        for name, p in model.named_parameters():
            if "input_layernorm" in name or "pre_feedforward" in name:
                p[7] = 0.02 - 1
    return model


def test_tiny_gemma3_massive_channels_w4_artefact_close_to_float(tmp_path):
    """fold_norms leaves the pre-norms (their fold would quantize the massive channel at full
    size), rotate_inputs rotates their readers online and rotate adds R2 and R4: the ONNX
    artefact computes the quantized module, which stays close to float, where the fold of every
    norm with R1 (the recipe before issue 27's fix) is far from it."""
    module = from_transformers(massive_gemma3())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    ref = run_logits(module, ids, torch.float64)["logits"]
    art = splice.compile(module.clone(), W4_GEMMA, "cpu", tmp_path / "a",
                         export_options={"accuracy_level": 0})
    report = json.loads((tmp_path / "a" / "manifest.json").read_text())["report"]
    by_name = {p["name"]: p["report"] for p in report["passes"]}
    pre = {f"layers.{i}.{r}" for i in range(3) for r in ("attn_norm", "mlp_norm")}
    assert pre <= set(by_name["fold_norms"]["left"]) <= set(by_name["rotate_inputs"]["rotated"]) | {
        n for n in by_name["fold_norms"]["left"] if "post_norm" in n or "q_norm" in n
        or "k_norm" in n}
    assert by_name["rotate"]["already_applied"] == ["r1"]
    quantized = run_passes(module.clone(), W4_GEMMA)[0]
    expect = run_logits(quantized, ids, torch.float64)["logits"]
    got = torch.from_numpy(art.logits(ids.numpy())[0]).double()
    assert ((got - expect).abs().max() / expect.abs().max()).item() <= 1e-4
    kl, top1 = kl_top1(ref, expect)
    before = Recipe("before", (("fold_norms", {"max_gain": 0}),) + W4_GEMMA.passes[2:], "")
    kl_before, _ = kl_top1(ref, run_logits(run_passes(module.clone(), before)[0], ids,
                                           torch.float64)["logits"])
    assert kl <= 0.02 and top1 >= 0.75 and kl_before >= 5 * kl, (kl, top1, kl_before)


@pytest.mark.parametrize("name", ["rotate", "w4_gptq_rotate"])
def test_tiny_gemma3_massive_channels_builtin_rotate_recipes(name):
    """The built-in rotate recipes on a Gemma 3 whose pre-norms fold_norms leaves (massive
    channel): rotate_inputs takes R1 online, rotate adds R2 (and R4), and the result is the float
    model (rotate alone: exact up to float32 rounding) or close to it (W4 GPTQ), where rotate
    refused R1 before rotate_inputs was in these recipes."""
    module = from_transformers(massive_gemma3())
    g = torch.Generator().manual_seed(2)
    calib = torch.randint(0, 256, (4, 32), generator=g)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    ref = run_logits(module, ids, torch.float64)["logits"]
    out, report = run_passes(module, Recipe.named(name), calibration=calib)
    by_name = {p["name"]: p for p in report}
    assert by_name["rotate_inputs"]["modified"]
    assert by_name["rotate"]["report"]["already_applied"] == ["r1"]
    got = run_logits(out, ids, torch.float64)["logits"]
    if name == "rotate":
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    else:
        kl, top1 = kl_top1(ref, got)
        assert kl <= 0.02 and top1 >= 0.75, (kl, top1)


@pytest.mark.parametrize("name", builtin_names())
def test_tiny_gemma3_every_builtin_recipe(name):
    """Every built-in recipe and preset on a tiny Gemma 3 with the massive channel (sandwich
    post-norms, (1 + w) norms, q/k norms, a tied table), its passes' settings as built in but for
    a tuning length that fits this model's 32-token calibration rows (and at most 16 tuning
    steps, where a recipe tunes over 512-token rows): the passes run and give
    finite logits that keep far more top-1 tokens than chance (1/256; W4 with a 4-bit head on
    random weights keeps about a quarter), or the recipe is refused with a message saying why:
    the pruning recipes (4 layers of a 3-layer model) by their first pass, the GGUF recipes by
    rotate, whose R1 llama.cpp's graph cannot take online (it names rotate_inputs)."""
    import dataclasses

    from splice.passes.infra.base import PassError

    module = from_transformers(massive_gemma3())
    g = torch.Generator().manual_seed(3)
    calib = torch.randint(0, 256, (4, 32), generator=g)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    built = Recipe.named(name)
    recipe = dataclasses.replace(built, passes=tuple(
        dataclasses.replace(p, tune_seq_len=32, tune_steps=min(p.tune_steps, 16))
        if getattr(p, "tune_seq_len", 0) > 32 else p for p in built.passes))
    if any(p.name == "select_layers" for p in recipe.passes):
        with pytest.raises(PassError, match="would prune every layer of a 3-layer model"):
            run_passes(module, recipe, calibration=calib)
        return
    if name.startswith("gguf"):
        with pytest.raises(PassError, match="rotate_inputs"):
            run_passes(module, recipe, calibration=calib)
        return
    ref = run_logits(module, ids, torch.float64)["logits"]
    out, _ = run_passes(module, recipe, calibration=calib)
    got = run_logits(out, ids, torch.float64)["logits"]
    assert torch.isfinite(got).all()
    assert kl_top1(ref, got)[1] >= 0.2, name


@pytest.mark.real
@needs_gemma3
def test_gemma3_270m_npu_artefact_under_1gb_with_its_tied_table_stored_once(tmp_path):
    """`splice compile GEMMA --target npu --calib TEXT` (the default npu_w8a16): one HTP partition
    per graph, the host's embedding rows read from the tied lm_head's int8 codes (no copy of the
    262k x 640 table of its own), the artefact under 1 GB (2.45 GB before), and ONNX Runtime's CPU
    on its QDQ graphs agrees with the float interpreter on most next tokens."""
    import subprocess
    import sys

    from benchmarks.npu_compare import cpu_decoder, stepwise
    from splice.frontend import load_model
    from splice.frontend.text import module_tokenizer, read_text
    from splice.runtime import load
    from tests.paths import WIKITEXT_VALID

    out = tmp_path / "npu"
    r = subprocess.run([sys.executable, "-m", "splice", "compile", str(GEMMA3), "--target", "npu",
                        "--calib", str(WIKITEXT_VALID), "--out", str(out)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["partitions"] for f in manifest["npu"]["figures"].values()] == [1, 1]
    assert manifest["io"]["embedding"]["layout"] == "columns"
    assert sum(f.stat().st_size for f in out.iterdir()) < 1e9
    module = load_model(str(GEMMA3))
    ids = [2] + list(module_tokenizer(module).encode(read_text(WIKITEXT_TEST)))[:63]
    ref = run_logits(module, torch.tensor([ids]))["logits"][0].numpy()
    cpu = stepwise(cpu_decoder(load(out)), ids, 48)
    assert (cpu.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
