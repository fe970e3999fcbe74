"""The llama2.c frontend and tokenizer on the real stories260K checkpoint.

The reference is transformers' LlamaForCausalLM built in this file from the raw checkpoint numbers
(its own parsing and RoPE-row permutation, written from SOURCE.md), so a shared bug in the
frontend's conversion cannot hide.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from splice import ir
from splice.errors import ArtefactError, FrontendError, InputError
from splice.frontend.llama2c import load_llama2c
from splice.runtime.llama2c_tokenizer import Llama2cTokenizer

SHARED = Path(__file__).parents[2].parent / "shared"
MODEL_DIR = SHARED / "models/stories260K"
BIN = MODEL_DIR / "stories260K.bin"
TOK = MODEL_DIR / "tok512.bin"
VAL = SHARED / "data/tinystories_val.txt"

pytestmark = pytest.mark.skipif(not BIN.is_file() or not TOK.is_file(),
                                reason=f"stories260K checkpoint not found at {MODEL_DIR}")

DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ = 64, 172, 5, 8, 4, 512, 512
HD = DIM // HEADS
STORY_START = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def module() -> ir.Module:
    return load_llama2c(BIN)


@pytest.fixture(scope="module")
def tok() -> Llama2cTokenizer:
    return Llama2cTokenizer.from_file(TOK)


def _raw_arrays() -> dict[str, np.ndarray]:
    """The legacy layout, parsed independently of the frontend."""
    flat = np.fromfile(BIN, dtype="<f4", offset=28)
    kvd = KV_HEADS * HD
    shapes = [("emb", (VOCAB, DIM)), ("rms_att", (LAYERS, DIM)), ("wq", (LAYERS, DIM, DIM)),
              ("wk", (LAYERS, kvd, DIM)), ("wv", (LAYERS, kvd, DIM)), ("wo", (LAYERS, DIM, DIM)),
              ("rms_ffn", (LAYERS, DIM)), ("w1", (LAYERS, HIDDEN, DIM)),
              ("w2", (LAYERS, DIM, HIDDEN)), ("w3", (LAYERS, HIDDEN, DIM)), ("rms_final", (DIM,)),
              ("freq_real", (SEQ * HD // 2,)), ("freq_imag", (SEQ * HD // 2,))]
    out, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = flat[pos:pos + n].reshape(shape)
        pos += n
    assert pos == flat.size
    return out


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    a = _raw_arrays()
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HD,
        max_position_embeddings=SEQ, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()

    def permute(w: np.ndarray, heads: int) -> torch.Tensor:   # SOURCE.md's recipe
        out_dim, in_dim = w.shape
        return torch.from_numpy(
            w.reshape(heads, HD // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim).copy())

    sd = {"model.embed_tokens.weight": torch.from_numpy(a["emb"].copy()),
          "model.norm.weight": torch.from_numpy(a["rms_final"].copy()),
          "lm_head.weight": torch.from_numpy(a["emb"].copy())}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.from_numpy(a["rms_att"][i].copy())
        sd[p + "post_attention_layernorm.weight"] = torch.from_numpy(a["rms_ffn"][i].copy())
        sd[p + "self_attn.q_proj.weight"] = permute(a["wq"][i], HEADS)
        sd[p + "self_attn.k_proj.weight"] = permute(a["wk"][i], KV_HEADS)
        sd[p + "self_attn.v_proj.weight"] = torch.from_numpy(a["wv"][i].copy())
        sd[p + "self_attn.o_proj.weight"] = torch.from_numpy(a["wo"][i].copy())
        sd[p + "mlp.gate_proj.weight"] = torch.from_numpy(a["w1"][i].copy())
        sd[p + "mlp.down_proj.weight"] = torch.from_numpy(a["w2"][i].copy())
        sd[p + "mlp.up_proj.weight"] = torch.from_numpy(a["w3"][i].copy())
    model.load_state_dict(sd, strict=False)
    for name, t in sd.items():
        assert torch.equal(model.state_dict()[name], t), name
    return model


# -- the checkpoint ---------------------------------------------------------------------------

def test_config_weights_and_tokenizer(module):
    ir.verify(module)
    c = module.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads,
            c.num_kv_heads, c.head_dim, c.intermediate_size, c.max_position) == \
        ("llama2c", VOCAB, DIM, LAYERS, HEADS, KV_HEADS, HD, HIDDEN, SEQ)
    assert (c.bos_token_id, c.eos_token_ids, c.extra["tie_embeddings"]) == (1, (2,), True)
    assert "lm_head.weight" not in module.weights
    assert module.tokenizer.kind == "llama2c"
    assert module.tokenizer.files["tokenizer.bin"] == TOK.read_bytes()
    inv = module.weights["rope.inv_freq"].double()
    assert torch.allclose(inv, 10000.0 ** (-torch.arange(0, HD, 2).double() / HD), rtol=1e-7)
    assert module.graph.find(op="rotary")[0].attrs["interleaved"] is False
    assert {n.origin for n in module.graph.nodes} == {"frontend.llama2c"}


def test_logits_match_transformers(module, reference, tok):
    ids = torch.tensor([tok.encode("Once upon a time, there was a big dog. The dog liked to run")])
    ours = ir.run_logits(module, ids)["logits"]
    with torch.no_grad():
        ref = reference(ids).logits
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert ours.shape == (1, ids.shape[1], VOCAB)


def test_prefill_then_decode_matches_full_sequence(module, reference, tok):
    ids = torch.tensor([tok.encode("Lily and Ben went to the park to play with a red ball.")])
    with torch.no_grad():
        ref = reference(ids).logits
    k = 6
    out = ir.run_logits(module, ids[:, :k])
    assert (out["logits"] - ref[:, :k]).abs().max().item() <= 1e-4
    past = ir.past_from_present(out)
    for t in range(k, ids.shape[1]):
        out = ir.run_logits(module, ids[:, t:t + 1], past=past)
        past = ir.past_from_present(out)
        diff = (out["logits"][:, 0] - ref[:, t]).abs().max().item()
        assert diff <= 1e-4, (t, diff)
    assert past["past.0.key"].shape == (1, KV_HEADS, ids.shape[1], HD)


def test_greedy_story_from_bos(module, tok):
    ids, past, step = [1], None, torch.tensor([[1]])
    for _ in range(40):
        out = ir.run_logits(module, step, past=past)
        past = ir.past_from_present(out)
        ids.append(int(out["logits"][0, -1].argmax()))
        step = torch.tensor([[ids[-1]]])
    assert tok.decode(ids).startswith(STORY_START), tok.decode(ids)


def test_untied_classifier(tmp_path, module):
    """A negative vocab_size means wcls follows the weights (without freq_cis)."""
    data = bytearray(BIN.read_bytes())
    struct.pack_into("<i", data, 20, -VOCAB)
    wcls = _raw_arrays()["emb"] * 0.5
    (tmp_path / "untied.bin").write_bytes(bytes(data) + wcls.astype("<f4").tobytes())
    m = load_llama2c(tmp_path / "untied.bin", TOK)
    ir.verify(m)
    assert m.config.extra["tie_embeddings"] is False
    assert torch.equal(m.weights["lm_head.weight"], torch.from_numpy(wcls))
    ids = torch.tensor([[1, 403, 407]])
    full = ir.run_logits(module, ids)["logits"]
    assert torch.allclose(ir.run_logits(m, ids)["logits"], full * 0.5, atol=1e-5)


def test_version1_layout_loads_the_same_weights(tmp_path, module):
    """llama2.c export.py's version 1: 256-byte header, norms first, no freq_cis."""
    a = _raw_arrays()
    header = struct.pack("<Ii7iB", 0x616B3432, 1, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB,
                         SEQ, 1)
    body = [a["rms_att"], a["rms_ffn"], a["rms_final"], a["emb"], a["wq"], a["wk"], a["wv"],
            a["wo"], a["w1"], a["w2"], a["w3"]]
    path = tmp_path / "v1.bin"
    path.write_bytes(header.ljust(256, b"\0") + b"".join(x.astype("<f4").tobytes() for x in body))
    m = load_llama2c(path, TOK)
    assert m.config.extra["llama2c_version"] == 1
    assert m.weights.keys() == module.weights.keys()
    for name, t in module.weights.items():
        assert torch.equal(m.weights[name], t), name


def test_tokenizer_found_beside_or_absent(tmp_path):
    (tmp_path / "m.bin").write_bytes(BIN.read_bytes())
    assert load_llama2c(tmp_path / "m.bin").tokenizer is None
    (tmp_path / "tokenizer.bin").write_bytes(TOK.read_bytes())
    assert load_llama2c(tmp_path / "m.bin").tokenizer.files["tokenizer.bin"] == TOK.read_bytes()


# -- bad checkpoints --------------------------------------------------------------------------

def _write(tmp_path: Path, data: bytes, name: str = "bad.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _with_header(**fields: int) -> bytes:
    data = bytearray(BIN.read_bytes())
    names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
    for name, value in fields.items():
        struct.pack_into("<i", data, 4 * names.index(name), value)
    return bytes(data)


@pytest.mark.parametrize("make, message", [
    (lambda: b"", "empty"),
    (lambda: b"\x01\x00\x00\x00" * 3, "shorter than the 28-byte header"),
    (lambda: BIN.read_bytes()[:-4], "truncated"),
    (lambda: BIN.read_bytes()[:1000], "truncated"),
    (lambda: BIN.read_bytes() + b"\0" * 8, "8 trailing bytes"),
    (lambda: _with_header(n_heads=0), "n_heads = 0"),
    (lambda: _with_header(dim=-64), "dim = -64"),
    (lambda: _with_header(n_heads=7), "does not divide dim"),
    (lambda: _with_header(n_kv_heads=3), "does not divide n_heads"),
    (lambda: _with_header(seq_len=1 << 30), "seq_len"),
    (lambda: _with_header(n_layers=4), "implies"),
    (lambda: _with_header(vocab_size=-VOCAB), "untied classifier"),
    (lambda: struct.pack("<Ii", 0x616B3432, 2) + b"\0" * 300, "export version 2"),
])
def test_bad_checkpoint_raises_frontend_error(tmp_path, make, message):
    path = _write(tmp_path, make())
    with pytest.raises(FrontendError, match=message) as info:
        load_llama2c(path, TOK)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_files(tmp_path):
    with pytest.raises(FrontendError, match="no such file"):
        load_llama2c(tmp_path / "nope.bin")
    with pytest.raises(FrontendError, match="tokenizer .*no such file"):
        load_llama2c(BIN, tmp_path / "nope_tok.bin")


@pytest.mark.parametrize("offset", [0, 3, 5, 9, 13, 17, 20, 23, 26, 27, 28, 1000, 40000, 523456,
                                    1056539])
def test_bit_flip_loads_or_raises_frontend_error(tmp_path, offset):
    """A flipped bit in the header is caught by the size check or the sanity checks; one in the
    weights only changes a number. Either way nothing but FrontendError may escape."""
    data = bytearray(BIN.read_bytes())
    data[offset] ^= 0x40 if offset % 2 else 0x01
    path = _write(tmp_path, bytes(data))
    try:
        m = load_llama2c(path, TOK)
    except FrontendError:
        assert offset < 28, f"a weight bit-flip at {offset} should still load"
        return
    ir.verify(m)


def test_tokenizer_of_wrong_size_is_refused(tmp_path):
    data = TOK.read_bytes()
    short = _write(tmp_path, data[:-(8 + 3)], "short_tok.bin")   # drops the last entry
    with pytest.raises(FrontendError, match="tokenizer"):
        load_llama2c(BIN, short)


# -- the tokenizer ----------------------------------------------------------------------------

def _run_c_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """run.c's encode, transcribed literally (quadratic rescans), as the oracle."""
    raw = text.encode("utf-8")
    lookup = {}
    for i, p in enumerate(tok.pieces):
        lookup.setdefault(p, i)
    ids = [1] + ([lookup[b" "]] if raw else [])
    buf, i = b"", 0
    while i < len(raw):
        if raw[i] & 0xC0 != 0x80:
            buf = b""
        buf += raw[i:i + 1]
        if i + 1 < len(raw) and raw[i + 1] & 0xC0 == 0x80 and len(buf) < 4:
            i += 1
            continue
        ids += [lookup[buf]] if buf in lookup else [b + 3 for b in buf]
        buf, i = b"", i + 1
    while True:
        best, best_id, best_idx = float(np.float32(-1e10)), -1, -1
        for j in range(len(ids) - 1):
            m = lookup.get(tok.pieces[ids[j]] + tok.pieces[ids[j + 1]])
            if m is not None and tok.scores[m] > best:
                best, best_id, best_idx = tok.scores[m], m, j
        if best_idx < 0:
            return ids
        ids[best_idx:best_idx + 2] = [best_id]


def _val_paragraphs(n: int) -> list[str]:
    text = VAL.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()][:n]


def test_encode_hand_checked(tok):
    ids = tok.encode("Once upon a time")
    assert ids == [1, 403, 407, 261, 378]
    assert [tok.pieces[i] for i in ids[1:]] == [b" Once", b" upon", b" a", b" time"]
    assert tok.encode("Once upon a time", bos=False, eos=True) == [403, 407, 261, 378, 2]
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (VOCAB, 1, 2)


@pytest.mark.skipif(not VAL.is_file(), reason=f"{VAL} not found")
def test_encode_matches_run_c_and_round_trips(tok):
    for para in _val_paragraphs(40):
        ids = tok.encode(para)
        assert ids == _run_c_encode(tok, para)
        assert tok.decode(ids) == para


@pytest.mark.parametrize("text", ["naïve café — 東京 🙂", "tab\there\nnewline", "  two spaces",
                                  "~[]™"])
def test_byte_fallback_round_trips(tok, text):
    ids = tok.encode(text)
    assert ids == _run_c_encode(tok, text)
    assert tok.decode(ids) == text
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


def test_decode_token_strips_space_after_bos_only(tok):
    once = tok.encode("Once", bos=False)[-1]
    assert tok.decode_token(1, once) == "Once"
    assert tok.decode_token(261, once) == " Once"
    assert tok.decode_token(None, 3 + ord("A")) == "A"
    with pytest.raises(InputError, match="out of range"):
        tok.decode([1, VOCAB])


@pytest.mark.parametrize("data, message", [
    (b"", "max_token_length"),
    (struct.pack("<i", 0) + b"\0" * 12, "max_token_length is 0"),
    (struct.pack("<i", 7) + struct.pack("<fi", 0.0, 3) + b"ab", "needs 3 bytes"),
    (struct.pack("<i", 7) + struct.pack("<fi", 0.0, 9) + b"a" * 9, "length 9"),
    (struct.pack("<i", 7) + struct.pack("<f", 0.0), "truncated"),
    (struct.pack("<i", 7) + struct.pack("<fi", float("nan"), 1) + b"a", "NaN"),
    (struct.pack("<i", 7) + struct.pack("<fi", 0.0, 1) + b"a", "at least 3"),
])
def test_malformed_tokenizer_raises_artefact_error(data, message):
    with pytest.raises(ArtefactError, match=message):
        Llama2cTokenizer.from_bytes(data)


def test_tokenizer_vocab_size_is_checked():
    with pytest.raises(ArtefactError, match="512 tokens; the model expects 32000"):
        Llama2cTokenizer.from_bytes(TOK.read_bytes(), vocab_size=32000)


def test_tokenizer_imports_without_torch():
    """The runtime runs on edge devices without torch; the tokenizer must not pull it in."""
    import subprocess
    import sys

    code = ("import sys; from splice.runtime.llama2c_tokenizer import Llama2cTokenizer; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
