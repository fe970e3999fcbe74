"""Property tests (hypothesis) over the readers of untrusted text and bytes.

  * the IR text parser, `parse_graph`: random text and mutations of a valid printed graph may
    only raise IRError (ParseError, VerifyError); a graph that parses prints to text that parses
    back to the same text;
  * the artefact reader, `runtime.load`: random bytes, byte mutations and JSON-tree mutations of a
    valid manifest.json may only raise InputError (ArtefactError), and an artefact that loads must
    generate, or refuse with an InputError;
  * the llama2.c reader, `load_llama2c`: random bytes and mutations (truncation, bit flips,
    overwritten header fields) of a valid small checkpoint may only raise FrontendError, and a
    module that loads verifies;
  * the tokenizer readers (tokenizer.json, llama2.c tok*.bin): only InputError, and a tokenizer
    that loads encodes, decodes and streams;
  * the checkpoint readers behind transformers (a safetensors directory, a GGUF file, through
    `load_model`): only FrontendError; a fifth as many inputs, as each one costs a model build;
  * what is read before any work (issue 26): the GGUF architecture peek never raises (a str or
    None); the path checks of splice/checks.py raise only InputError and leave the directory they
    look at as it was; the number checks return a value in range or raise InputError.

In CI each target tries a fixed, derandomised 150 inputs; `make fuzz` (pytest --fuzz-examples N)
tries N fresh random ones per target. The counts appear in the summary at the end.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splice.errors import FrontendError, InputError
from splice.ir import IRError, parse_graph, print_graph
from tests.reliability.conftest import TRIED


def run_property(name: str, strategy, check, examples: tuple[int, bool]) -> None:
    """Run `check` on `examples[0]` inputs drawn from `strategy` and count them."""
    n, derandomize = examples
    count = [0]

    @settings(max_examples=n, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(value):
        count[0] += 1
        check(value)

    try:
        prop()
    finally:
        TRIED["fuzz inputs"][name] += count[0]


# -- mutations -----------------------------------------------------------------------------------

@st.composite
def byte_mutants(draw, data: bytes, max_edits: int = 4) -> bytes:
    """`data` with a few edits: bit flips, deletions, insertions, truncation, duplication."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        if not out:
            out += draw(st.binary(min_size=1, max_size=16))
            continue
        kind = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "overwrite",
                                     "duplicate"]))
        i = draw(st.integers(0, len(out) - 1))
        if kind == "flip":
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del out[i:i + draw(st.integers(1, 16))]
        elif kind == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del out[i:]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            out[i:i + len(chunk)] = chunk
        else:
            j = draw(st.integers(i, min(len(out), i + 64)))
            out[j:j] = out[i:j]
    return bytes(out)


IR_TOKENS = ["%", ":", "[", "]", "{", "}", "(", ")", ",", " = ", "f32", "i64", "bool", "f16",
             "return ", "const ", "none", "-1", "0", "99999999999999999999", '"', "null", "\n",
             "linear", "attention", "rms_norm", "embedding", "add", "batch", "seq", "%x", "#",
             "{}", '{"layer": "a"}', '{"layer": 1.5}', '"\\u0000"', "é", "graph(", ") {", "}\n",
             "[-3]", "[batch, seq, 64]", "{\"eps\": []}", "true", "1e999", "NaN"]


@st.composite
def text_mutants(draw, text: str) -> str:
    """`text` with a few line- and token-level edits, the kinds of damage a hand edit or a
    bad merge does to a dump."""
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["token", "delete_chars", "drop_line", "dup_line",
                                     "swap_lines", "replace_line"]))
        i = draw(st.integers(0, len(lines) - 1))
        if kind == "token":
            line = lines[i]
            j = draw(st.integers(0, len(line)))
            k = draw(st.integers(j, min(len(line), j + draw(st.integers(0, 6)))))
            lines[i] = line[:j] + draw(st.sampled_from(IR_TOKENS)) + line[k:]
        elif kind == "delete_chars":
            line = lines[i]
            j = draw(st.integers(0, len(line)))
            lines[i] = line[:j] + line[j + draw(st.integers(1, 10)):]
        elif kind == "drop_line" and len(lines) > 1:
            del lines[i]
        elif kind == "dup_line":
            lines.insert(i, lines[i])
        elif kind == "swap_lines":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = draw(st.text(max_size=40))
    return "\n".join(lines)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6)


def _json_paths(value, prefix=()) -> list[tuple]:
    paths = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            paths += _json_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            paths += _json_paths(v, prefix + (i,))
    return paths


@st.composite
def json_mutants(draw, doc: dict) -> bytes:
    """`doc` with a value somewhere in its tree replaced, deleted, or joined by a new key."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_json_paths(doc)))
        if not path:
            doc = draw(JSON_VALUES) if draw(st.integers(0, 9)) == 0 else doc
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        kind = draw(st.sampled_from(["replace", "delete", "add"]))
        if kind == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif kind == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            parent.insert(path[-1], draw(JSON_VALUES))
        if not isinstance(doc, (dict, list)):
            break
    return json.dumps(doc).encode()


# -- the IR parser -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def printed_graph() -> str:
    from tests.tiny import VARIANTS, tiny_module

    return print_graph(tiny_module(seed=3, **VARIANTS["gemma2"]).graph)


def _check_parse(text: str) -> None:
    try:
        graph = parse_graph(text)
    except IRError:
        return
    again = print_graph(graph)
    assert print_graph(parse_graph(again)) == again


def test_fuzz_ir_parser(printed_graph, fuzz_examples):
    _check_parse(printed_graph)     # the seed itself parses
    strategy = st.one_of(text_mutants(printed_graph), text_mutants(printed_graph),
                         st.text(max_size=200),
                         st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
    run_property("IR text parser", strategy, _check_parse, fuzz_examples)


# -- the artefact reader -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_artefact(tmp_path_factory) -> Path:
    from splice.backends.onnx import export
    from tests.tiny import tiny_module

    return export(tiny_module(seed=5), tmp_path_factory.mktemp("fuzz") / "art")


def _check_load(art_dir: Path, manifest: bytes) -> None:
    from splice.runtime import load

    (art_dir / "manifest.json").write_bytes(manifest)
    try:
        art = load(art_dir)
        art.generate("hi", max_new_tokens=2)
        art.logits([[1, 2, 3]])
    except InputError:
        return


def test_fuzz_manifest(tiny_artefact, fuzz_examples):
    good = (tiny_artefact / "manifest.json").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "art"
        shutil.copytree(tiny_artefact, work)
        _check_load(work, good)     # the seed itself loads
        strategy = st.one_of(json_mutants(json.loads(good)), json_mutants(json.loads(good)),
                             json_mutants(json.loads(good)), byte_mutants(good),
                             st.binary(max_size=300))
        run_property("manifest reader", strategy, lambda m: _check_load(work, m), fuzz_examples)


# -- the llama2.c reader -------------------------------------------------------------------------

L2C_HEADER = dict(dim=16, hidden_dim=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32,
                  seq_len=16)


def llama2c_bytes(seed: int = 0, version: int = 0) -> bytes:
    """A valid llama2.c checkpoint (legacy, or version 1) with random float32 weights."""
    h = L2C_HEADER
    dim, hid, n, v = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
    hd = dim // h["n_heads"]
    kvd = h["n_kv_heads"] * hd
    count = (v * dim + 2 * n * dim + n * (2 * dim * dim + 2 * kvd * dim) + 3 * n * hid * dim
             + dim)
    if version == 0:
        count += h["seq_len"] * hd      # freq_cis real and imaginary halves
        head = struct.pack("<7i", *h.values())
    else:
        head = struct.pack("<Ii7iB", 0x616B3432, 1, *h.values(), 1).ljust(256, b"\0")
    weights = np.random.default_rng(seed).standard_normal(count).astype("<f4") * 0.1
    return head + weights.tobytes()


@st.composite
def header_mutants(draw, data: bytes, version: int) -> bytes:
    """One of the 7 header ints (or the v1 flag) replaced by an arbitrary value."""
    out = bytearray(data)
    offset = 0 if version == 0 else 8
    field = draw(st.integers(0, 6))
    value = draw(st.integers(-2**31, 2**31 - 1) | st.integers(-4, 70))
    struct.pack_into("<i", out, offset + 4 * field, value)
    if version == 1 and draw(st.booleans()):
        out[36] = draw(st.integers(0, 255))
    return bytes(out)


def _check_llama2c(folder: Path, data: bytes) -> None:
    from splice.frontend.llama2c import load_llama2c
    from splice.ir import verify

    path = folder / "model.bin"
    path.write_bytes(data)
    try:
        module = load_llama2c(path)
    except FrontendError:
        return
    verify(module)


def test_fuzz_llama2c_reader(fuzz_examples):
    legacy, v1 = llama2c_bytes(0, 0), llama2c_bytes(1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seed in (legacy, v1):
            _check_llama2c(folder, seed)
        strategy = st.one_of(byte_mutants(legacy), byte_mutants(v1),
                             byte_mutants(legacy[:300]).map(lambda b: b + legacy[300:]),
                             header_mutants(legacy, 0), header_mutants(v1, 1),
                             st.binary(max_size=400))
        run_property("llama2.c reader", strategy, lambda d: _check_llama2c(folder, d),
                     fuzz_examples)


# -- the tokenizer readers (files an artefact or a llama2.c checkpoint carries) -------------------

def _check_tokenizer(kind_files: tuple[str, dict[str, bytes]]) -> None:
    from splice.runtime.tokenizer import load_tokenizer

    kind, files = kind_files
    try:
        tok = load_tokenizer(kind, files)
        ids = tok.encode("Once upon a time, é 漢字", bos=True)
        tok.decode(ids)
        decoder = tok.stream(ids[:1])
        for i in ids[1:]:
            decoder.push(i)
        decoder.flush()
    except InputError:
        return


def test_fuzz_tokenizers(fuzz_examples):
    from tests.paths import STORIES
    from tests.tiny import byte_tokenizer

    hf = byte_tokenizer().files
    seeds = [st.tuples(st.just("hf"), byte_mutants(hf["tokenizer.json"], 6).map(
        lambda b: {**hf, "tokenizer.json": b})),
        st.tuples(st.just("hf"), json_mutants(json.loads(hf["tokenizer.json"])).map(
            lambda b: {**hf, "tokenizer.json": b}))]
    tok512 = STORIES.with_name("tok512.bin")
    if tok512.is_file():
        data = tok512.read_bytes()
        seeds.append(st.tuples(st.just("llama2c"), byte_mutants(data).map(
            lambda b: {"tokenizer.bin": b})))
    for kind, files in (("hf", hf),) + ((("llama2c", {"tokenizer.bin": data}),)
                                        if tok512.is_file() else ()):
        _check_tokenizer((kind, files))     # the seeds themselves work
    run_property("tokenizer readers", st.one_of(*seeds), _check_tokenizer, fuzz_examples)


# -- the checkpoint readers behind transformers (safetensors directories, GGUF files) --------------

def _check_checkpoint(path: Path, data: bytes) -> None:
    from splice.frontend import load_model

    path.write_bytes(data)
    try:
        load_model(path.parent if path.suffix == ".safetensors" else path)
    except FrontendError:
        return


def test_fuzz_checkpoint_readers(bases, fuzz_examples):
    """Fewer inputs than the other targets (a fifth): each one goes through transformers."""
    n, derandomize = fuzz_examples
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        shutil.copytree(bases["hf"], hf)
        st_file, gguf_file = hf / "model.safetensors", Path(tmp) / "m.gguf"
        st_data, gguf_data = st_file.read_bytes(), bases["gguf"].read_bytes()
        header = 8 + int.from_bytes(st_data[:8], "little")

        def check(choice: tuple[str, bytes]) -> None:
            _check_checkpoint(st_file if choice[0] == "st" else gguf_file, choice[1])

        strategy = st.one_of(
            st.tuples(st.just("st"), byte_mutants(st_data[:header]).map(
                lambda b: b + st_data[header:])),
            st.tuples(st.just("st"), byte_mutants(st_data)),
            st.tuples(st.just("gguf"), byte_mutants(gguf_data[:2000]).map(
                lambda b: b + gguf_data[2000:])),
            st.tuples(st.just("gguf"), byte_mutants(gguf_data)))
        run_property("checkpoint readers (safetensors, GGUF)", strategy, check,
                     (max(20, n // 5), derandomize))


# -- what is read before any work: the GGUF architecture peek, the argument checks ----------------

def _check_gguf_architecture(path: Path, data: bytes) -> str | None:
    """The header walk (architecture and tensor types) never raises: None where the header
    cannot be read that far; the type check after it refuses only with a FrontendError."""
    from splice.errors import FrontendError
    from splice.frontend.hf import _gguf_header, check_gguf_types

    path.write_bytes(data)
    arch, types = _gguf_header(path)
    assert arch is None or isinstance(arch, str)
    assert types is None or all(isinstance(k, str) and isinstance(v, int)
                                for k, v in types.items())
    if types:
        try:
            check_gguf_types(path, types)
        except FrontendError:
            pass
    return arch


def test_fuzz_gguf_architecture_peek(bases, fuzz_examples):
    import gguf

    from splice.frontend.hf import _gguf_header

    data = bases["gguf"].read_bytes()[:4096]   # metadata and tensor table: 1.6 kB
    # the tiny file's table as gguf's own reader gives it: the walk reads the same types
    reader = gguf.GGUFReader(str(bases["gguf"]))
    assert _gguf_header(bases["gguf"])[1] == {t.name: int(t.tensor_type) for t in reader.tensors}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        assert _check_gguf_architecture(path, data) == "llama"
        strategy = st.one_of(byte_mutants(data, 6),
                             st.binary(max_size=300).map(lambda b: b"GGUF" + b))
        run_property("GGUF architecture peek", strategy,
                     lambda d: _check_gguf_architecture(path, d), fuzz_examples)


def _check_path_arguments(root: Path, text: str) -> None:
    """Only InputError from the path checks, and nothing under `root` created or removed."""
    from splice import checks
    from tests.reliability.conftest import tree_digest

    before = tree_digest(root)
    value = str(root / text.lstrip("/")) if text.strip() else text
    for check in (lambda v: checks.input_file(v, "input"),
                  lambda v: checks.output_dir(v, "out", "artefact"),
                  lambda v: checks.output_dir(v, "dump")):
        try:
            check(value)
        except InputError:
            pass
    assert tree_digest(root) == before


def test_fuzz_path_arguments(fuzz_examples, tmp_path):
    root = tmp_path / "root"
    (root / "art").mkdir(parents=True)
    (root / "art" / "manifest.json").write_text("{}")
    (root / "file.txt").write_text("x")
    (root / "dir" / "sub").mkdir(parents=True)
    names = st.sampled_from(["art", "file.txt", "dir", "dir/sub", "missing", "file.txt/x", ".",
                             "..", ""])
    strategy = st.one_of(st.text(max_size=40), st.lists(names, max_size=4).map("/".join),
                         st.tuples(names, st.text(max_size=10)).map("/".join))
    run_property("path argument checks", strategy, lambda t: _check_path_arguments(root, t),
                 fuzz_examples)


def test_fuzz_number_arguments(fuzz_examples):
    import math

    from splice import checks

    def check(value) -> None:
        try:
            n = checks.integer(value, "n", minimum=0, optional=True)
            assert n is None or (type(n) is int and n >= 0)
        except InputError:
            pass
        try:
            x = checks.number(value, "x", above=0, maximum=1)
            assert math.isfinite(x) and 0 < x <= 1
        except InputError:
            pass

    strategy = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5),
                         st.floats(allow_nan=True, allow_infinity=True))
    run_property("number argument checks", strategy, check, fuzz_examples)
