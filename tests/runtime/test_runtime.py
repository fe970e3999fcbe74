"""The runtime on an exported tiny model: logits and greedy generation equal the reference
interpreter's, streaming gives the same text, it runs without torch, it refuses tampered artefacts
and over-long prompts, and writing an artefact is atomic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from splice.backends.artefact import write_artefact
from splice.backends.onnx import export
from splice.ir import Tokenizer, past_from_present, run_logits
from splice.runtime import load, verify_artefact
from splice.runtime.manifest import MANIFEST, sha256_file
from splice.runtime.tokenizer import load_tokenizer

from splice.errors import ArtefactError, InputError
from tests.paths import SHARED
from tests.tiny import byte_tokenizer, tiny_module

TOK512 = SHARED / "models" / "stories260K" / "tok512.bin"


@pytest.fixture(scope="module")
def module():
    return tiny_module(seed=7)


@pytest.fixture(scope="module")
def artefact_dir(module, tmp_path_factory):
    return export(module, tmp_path_factory.mktemp("art") / "tiny", recipe={"passes": []},
                  report={"passes": []})


def reference_greedy(module, ids: list[int], n: int) -> list[int]:
    out = run_logits(module, torch.tensor([ids]))
    new = []
    for _ in range(n):
        tok = int(out["logits"][0, -1].argmax())
        new.append(tok)
        out = run_logits(module, torch.tensor([[tok]]), past=past_from_present(out))
    return new


@pytest.mark.parametrize("opt", [False, True])
def test_logits_with_cache_match_interpreter(module, artefact_dir, opt):
    art = load(artefact_dir, graph_optimization=opt)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    ref = run_logits(module, ids)
    got, cache = art.logits(ids.numpy())
    assert np.abs(got - ref["logits"].numpy()).max() <= 1e-4
    for _ in range(32):
        tok = ref["logits"][:, -1:].argmax(-1)
        ref = run_logits(module, tok, past=past_from_present(ref))
        got, cache = art.logits(tok.numpy(), past=cache)
        assert np.abs(got - ref["logits"].numpy()).max() <= 1e-4
    assert cache.length == 42
    np.testing.assert_allclose(cache["past.1.value"], ref["present.1.value"].numpy(), atol=1e-4)
    # a cache given as plain arrays works the same
    again, _ = art.logits(tok.numpy(), past={k: v.numpy() for k, v in
                                             past_from_present(ref).items()})
    assert again.shape == (1, 1, module.config.vocab_size)


def test_greedy_generation_equals_interpreter_argmax(module, artefact_dir):
    art = load(artefact_dir)
    prompt = "Once upon"
    ids = art.tokenizer.encode(prompt, bos=True)
    expected = reference_greedy(module, ids, 24)
    result = art.generate_ids(prompt, max_new_tokens=24)
    assert result.prompt_ids == ids
    assert result.ids == expected
    assert result.stop == "length"
    assert result.prefill_tok_s > 0 and result.decode_tok_s > 0 and result.decode_steps == 23
    assert art.last_stats["new_tokens"] == 24


def test_stream_yields_the_generated_text(artefact_dir):
    art = load(artefact_dir)
    seen = []
    pieces = list(art.stream("The cat", max_new_tokens=30, callback=seen.append))
    text = art.generate("The cat", max_new_tokens=30)
    assert "".join(pieces) == text and seen == pieces and len(pieces) > 1
    ids = art.generate_ids("The cat", max_new_tokens=30).ids
    assert text == art.tokenizer.decode(ids)


def test_stream_decoder_holds_back_split_characters():
    tok = load_tokenizer("hf", byte_tokenizer().files)
    text = "héllo wörld ✓ 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte: characters are split
    dec = tok.stream()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_generation_stops_at_eos(module, tmp_path):
    ids = [256, 65, 66]
    greedy = reference_greedy(module, ids, 6)
    eos = next(t for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    m = tiny_module(seed=7, eos_token_ids=(eos,))
    art = load(export(m, tmp_path / "eos"))
    result = art.generate_ids(ids, max_new_tokens=6)
    assert result.stop == "eos" and result.ids == greedy[:greedy.index(eos)]
    assert art.generate_ids(ids, max_new_tokens=6, stop_at_eos=False).ids == greedy


def test_sampling_is_seeded_and_top_k_1_is_greedy(artefact_dir):
    art = load(artefact_dir)
    kw = dict(max_new_tokens=16, greedy=False, temperature=0.8, top_p=0.9)
    a = art.generate_ids("ab", seed=3, **kw).ids
    assert a == art.generate_ids("ab", seed=3, **kw).ids
    assert a != art.generate_ids("ab", seed=4, **kw).ids
    top1 = art.generate_ids("ab", greedy=False, top_k=1, seed=5, max_new_tokens=16).ids
    assert top1 == art.generate_ids("ab", max_new_tokens=16).ids
    with pytest.raises(InputError, match="temperature"):
        art.generate_ids("ab", greedy=False, temperature=0.0)


def test_runs_without_torch(artefact_dir):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import splice.runtime as rt\n"
        f"art = rt.load({str(artefact_dir)!r})\n"
        "text = art.generate('hi', max_new_tokens=5)\n"
        "assert isinstance(text, str) and art.last_stats['new_tokens'] == 5\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_prompt_longer_than_context(artefact_dir):
    art = load(artefact_dir)
    with pytest.raises(InputError, match=r"prompt is 65 tokens long; the model's context is 64"):
        art.generate_ids(list(range(65)), max_new_tokens=1)
    _, cache = art.logits(np.arange(60))
    with pytest.raises(InputError, match=r"60 cached \+ 5 new tokens = 65 exceed .* 64"):
        art.logits(np.arange(5), past=cache)
    # a generation that reaches the end of the context stops there
    result = art.generate_ids(list(range(60)), max_new_tokens=10, stop_at_eos=False)
    assert result.stop == "context" and len(result.ids) == 5


# -- tampering ---------------------------------------------------------------------------------

@pytest.fixture
def copy(artefact_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artefact_dir, dst)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / MANIFEST).read_text())
    fn(m)
    (path / MANIFEST).write_text(json.dumps(m))


def test_intact_copy_loads_and_pins(copy):
    digest = sha256_file(copy / MANIFEST)
    load(copy, expected_manifest_sha256=digest)
    with pytest.raises(ArtefactError, match="not the pinned"):
        load(copy, expected_manifest_sha256="0" * 64)


def test_removed_file_is_refused(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ArtefactError, match=r"'tokenizer.json' is missing"):
        load(copy)


def test_changed_file_is_refused(copy):
    with open(copy / "model.onnx.data", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ArtefactError, match=r"'model.onnx.data' was changed"):
        load(copy)


def test_added_file_is_refused(copy):
    (copy / "sub").mkdir()
    (copy / "sub" / "extra.py").write_text("print('hi')")
    with pytest.raises(ArtefactError, match=r"'sub/extra.py' is not listed"):
        load(copy)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", "C:/x", "a\\..\\..\\x",
                                 "./model.onnx", "a//b"])
def test_manifest_paths_cannot_escape(copy, bad):
    _edit_manifest(copy, lambda m: m["files"].update({bad: "0" * 64}))
    with pytest.raises(ArtefactError, match="artefact path"):
        load(copy)


def test_symlinked_file_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copyfile(copy / "tokenizer.json", outside)  # same bytes, same hash
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(ArtefactError, match="symlink"):
        load(copy)


def test_path_through_a_symlinked_directory_is_refused(copy, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    shutil.copyfile(copy / "tokenizer.json", tmp_path / "elsewhere" / "t.json")
    (copy / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    digest = sha256_file(copy / "tokenizer.json")
    _edit_manifest(copy, lambda m: m["files"].update({"sub/t.json": digest}))
    with pytest.raises(ArtefactError, match="symlink"):
        load(copy)


def test_missing_or_broken_manifest(copy):
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(ArtefactError, match="not valid JSON"):
        load(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(ArtefactError, match="no manifest.json"):
        load(copy)


# -- atomic writing ----------------------------------------------------------------------------

FIELDS = {"backend": "test", "target": "none"}


def _fail(dest):
    dest.write_bytes(b"half")
    raise OSError("disk full (simulated)")


def test_failed_write_leaves_previous_artefact_intact(copy):
    before = (copy / MANIFEST).read_bytes()
    with pytest.raises(OSError, match="simulated"):
        write_artefact(copy, {"a.bin": b"new", "b.bin": _fail}, FIELDS)
    assert (copy / MANIFEST).read_bytes() == before
    verify_artefact(copy)
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy"]


def test_rewrite_replaces_and_refuses_foreign_directories(tmp_path):
    out = write_artefact(tmp_path / "a", {"x.bin": b"1", "sub/y.bin": b"2"}, FIELDS)
    write_artefact(out, {"z.bin": b"3"}, FIELDS)
    assert verify_artefact(out)["files"] == {"z.bin": sha256_file(out / "z.bin")}
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(ArtefactError, match="not a splice artefact"):
        write_artefact(home, {"z.bin": b"3"}, FIELDS)
    assert (home / "notes.txt").read_text() == "precious"
    with pytest.raises(ArtefactError, match="artefact path"):
        write_artefact(tmp_path / "b", {"../escape.bin": b"3"}, FIELDS)


def test_interrupted_swap_is_recovered(tmp_path):
    out = write_artefact(tmp_path / "a", {"x.bin": b"1"}, FIELDS)
    os.rename(out, tmp_path / ".a.old-1-dead")  # a crash between the two renames
    with pytest.raises(OSError, match="simulated"):
        write_artefact(out, {"y.bin": _fail}, FIELDS)
    assert verify_artefact(out)["files"] == {"x.bin": sha256_file(out / "x.bin")}


def test_concurrent_writers_do_not_corrupt(tmp_path):
    out = tmp_path / "a"
    errors = []

    def writer(i):
        try:
            write_artefact(out, {f"f{j}.bin": bytes([i]) * 50000 for j in range(5)}, FIELDS)
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    files = verify_artefact(out)["files"]
    assert len(files) == 5 and len({(out / f).read_bytes() for f in files}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a"]     # no lock file, no temporaries


def test_a_writer_waits_for_the_lock_on_the_parent_directory(tmp_path):
    """The lock is a flock on the parent directory itself: a second writer waits while it is
    held (no file is needed for that, so none is left), and proceeds once it is released."""
    from splice.backends.artefact import _locked

    out = tmp_path / "a"
    done = threading.Event()
    t = threading.Thread(target=lambda: (write_artefact(out, {"x.bin": b"1"}, FIELDS),
                                         done.set()))
    with _locked(tmp_path):
        t.start()
        assert not done.wait(0.5) and not out.exists()
        assert list(tmp_path.iterdir()) == []
    t.join(10)
    assert done.is_set() and verify_artefact(out)["files"] == {"x.bin": sha256_file(out / "x.bin")}
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


@pytest.mark.skipif(not TOK512.is_file(), reason=f"{TOK512} not found")
def test_llama2c_tokenizer_artefact(tmp_path):
    m = tiny_module(seed=2, vocab_size=512)
    m.tokenizer = Tokenizer("llama2c", {"tokenizer.bin": TOK512.read_bytes()})
    art = load(export(m, tmp_path / "l2c"))
    assert art.tokenizer.encode("Hi", bos=True)[0] == 1
    text = art.generate("Once", max_new_tokens=20, stop_at_eos=False)
    assert "".join(art.stream("Once", max_new_tokens=20, stop_at_eos=False)) == text
    ids = art.generate_ids("Once", max_new_tokens=20, stop_at_eos=False).ids
    assert len(ids) == 20 and text == art.tokenizer.decode(ids)


def test_onnxruntime_genai_runs_the_artefact(module, artefact_dir):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(artefact_dir))
    ids = og.Tokenizer(model).encode("Once upon")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    assert out == reference_greedy(module, [int(i) for i in ids], len(out)) and len(out) == 12
