"""The bad-input corpus: one line per case, run through the CLI and through the Python API.

A case is a `splice` command line whose {placeholders} name inputs (inputs.BUILDERS), the good
bases ({stories}, {hf}, {gguf}, {artefact}), a recipe ({recipe:NAME} from RECIPES) or {out}, a
fresh output directory. It must end with exit code 2 (an InputError through the API), one line on
stderr that holds every `needle` (case-insensitive), no traceback, and nothing written: {out}
absent (through the API it is a copy of a good artefact, which must stay byte-identical), and
every input the command names unchanged. `may_succeed` marks bit flips in weights: they are just
other numbers, so a successful compile is fine too; a failure must still be exit 2.

`requires` names a pass (and optionally a setting) that must be registered for the case to run,
so cases for passes still being written are one line here and light up when the pass lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path



@dataclass(frozen=True)
class Case:
    id: str
    category: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    may_succeed: bool = False
    requires: tuple[str, ...] = ()
    cli_only: bool = False     # an argument the Python API has no form of (debug, bisect, ...)


def case(category: str, id: str, cmd: str, *needles: str, may_succeed: bool = False,
         requires: tuple[str, ...] = (), cli_only: bool = False) -> Case:
    """`cmd` is split on whitespace; a "|" separates arguments that hold spaces. A compile that
    names no recipe runs fold_norms: the default preset calibrates, and its refusal of a missing
    --calib would come before the input the case is about."""
    argv = tuple(cmd.split("|")) if "|" in cmd else tuple(cmd.split())
    if argv[0] == "compile" and "--recipe" not in argv:
        argv += ("--recipe", "fold_norms")
    return Case(id, category, argv, tuple(needles), may_succeed, requires, cli_only)


_C = "compile {stories} --out {out} --recipe {recipe:%s}"
_CAL = "compile {stories} --out {out} --calib {calib_ok.txt} --recipe {recipe:%s}"
CAL = "[calibration]\nsamples = 2\nseq_len = 64\n"

RECIPES = {
    "unknown_pass": '[[pass]]\nname = "frobnicate"\n',
    "unknown_setting": '[[pass]]\nname = "fold_norms"\nbogus = 3\n',
    "wrong_type": '[[pass]]\nname = "fold_norms"\nuntie = "yes"\n',
    "bad_toml": '[[pass]\nname = "fold_norms"\n',
    "unknown_key": 'frobnicate = 1\n',
    "pass_without_name": '[[pass]]\nuntie = true\n',
    "negative_seed": 'seed = -1\n',
    "calibration_type": '[calibration]\nsamples = "many"\n',
    "calibration_key": '[calibration]\ntokens = 5\n',
    "not_utf8": "name = \"\xff\"\n",
    "prune_too_many": '[[pass]]\nname = "prune_layers"\nstart = 1\nn = 100\n',
    "prune_all": '[[pass]]\nname = "prune_layers"\nstart = 0\nn = 5\nallow_first = true\n',
    "prune_first": '[[pass]]\nname = "prune_layers"\nstart = 0\nn = 1\n',
    "prune_zero": '[[pass]]\nname = "prune_layers"\nstart = 1\nn = 0\n',
    "prune_past_end": '[[pass]]\nname = "prune_layers"\nstart = 4\nn = 3\n',
    "prune_nothing_chosen": '[[pass]]\nname = "prune_layers"\n',
    "select_too_many": CAL + '[[pass]]\nname = "select_layers"\nn = 10\n',
    "select_without_calibration": '[[pass]]\nname = "select_layers"\nn = 2\n',
    "select_bad_metric": '[[pass]]\nname = "select_layers"\nmetric = "vibes"\n',
    "patch_without_prune": CAL + '[[pass]]\nname = "select_layers"\nn = 1\n'
                                 '[[pass]]\nname = "estimate_patch"\n'
                                 '[[pass]]\nname = "fuse_patch"\n',
    "patch_nothing_chosen": '[[pass]]\nname = "estimate_patch"\n',
    "patch_bad_holdout": CAL + '[[pass]]\nname = "estimate_patch"\nstart = 1\nn = 1\n'
                               'holdout = 2.0\n',
    "fuse_bad_strategy": '[[pass]]\nname = "fuse_patch"\nstrategy = "magic"\n',
    "rotate_before_fold": '[[pass]]\nname = "rotate"\n',
    "rotate_int_for_bool": '[[pass]]\nname = "rotate"\nr1 = 1\n',
    "quantize_int3": '[[pass]]\nname = "quantize_weights"\nbits = 3\ngroup_size = 0\n',
    "quantize_bits_string": '[[pass]]\nname = "quantize_weights"\nbits = "four"\n',
    "quantize_bad_method": '[[pass]]\nname = "quantize_weights"\nmethod = "magic"\n',
    "quantize_bad_group": '[[pass]]\nname = "quantize_weights"\ngroup_size = 100\n',
    "gptq_without_calibration": '[[pass]]\nname = "quantize_weights"\nmethod = "gptq"\n'
                                'group_size = 0\n',
    "act_roles_match_nothing": '[[pass]]\nname = "quantize_activations"\n'
                               'roles = ["attention.wq"]\n',
}

_ART = "run {%s} Once --max-new-tokens 2"
LOADS = "may succeed"   # marks a case whose input may also load (bit flips in weights)


def compiles(category: str, rows: tuple) -> list[Case]:
    """`compile {INPUT} --out {out}` for rows of (input name, needles...); the case id is the
    input's name without its suffix."""
    return [case(category, name.split(".")[0], f"compile {{{name}}} --out {{out}}",
                 *[n for n in needles if n != LOADS], may_succeed=LOADS in needles)
            for name, *needles in rows]


def recipes(rows: tuple, cmd: str = _C, requires: tuple[str, ...] = ()) -> list[Case]:
    """One case per (recipe name, needles...): `cmd` with the recipe's file."""
    return [case("recipe", name, cmd % name, *needles, requires=requires)
            for name, *needles in rows]


CASES: list[Case] = [
    *compiles("checkpoint", (
        ("l2c_missing.bin", "not found", "accepted"),
        ("l2c_empty.bin", "empty", "header"),
        ("l2c_short_header.bin", "shorter than"),
        ("l2c_header_only.bin", "truncated", "implies"),
        ("l2c_half.bin", "truncated"),
        ("l2c_minus_one.bin", "truncated"),
        ("l2c_trailing.bin", "trailing bytes"),
        ("l2c_flip_dim.bin", "dim", "expected 1.."),
        ("l2c_flip_vocab_sign.bin", "vocab_size"),
        ("l2c_flip_heads.bin", "n_heads 9 does not divide"),
        ("l2c_flip_weights.bin", LOADS),
        ("l2c_flip_exponent.bin", LOADS),
        ("l2c_random.bin", "header", "expected"),
        ("hf_missing", "not found", "accepted"),
        ("hf_no_config", "without config.json"),
        ("hf_config_not_json", "not valid JSON"),
        ("hf_empty_st", "model.safetensors is empty"),
        ("hf_truncated_st", "truncated"),
        ("hf_header_cut_st", "truncated"),
        ("hf_flip_header_st", "safetensors"),
        ("hf_flip_len_st", "header claims"),
        ("hf_flip_weights_st", LOADS),
        ("hf_pickle_only", "unpickling"),
        ("gguf_missing.gguf", "not found"),
        ("gguf_empty.gguf", "empty"),
        ("gguf_magic_only.gguf", "truncated or corrupt"),
        ("gguf_header_cut.gguf", "truncated or corrupt"),
        ("gguf_half.gguf", "truncated or corrupt"),
        ("gguf_minus_one.gguf", "truncated or corrupt"),
        ("gguf_flip_magic.gguf", "not a GGUF file"),
        ("gguf_flip_version.gguf", "gguf"),
        ("gguf_flip_counts.gguf", "gguf"),
        ("gguf_flip_meta.gguf", LOADS),
        ("gguf_flip_weights.gguf", LOADS),
        # weights that load but are not usable: named at import
        ("l2c_nan.bin", "NaN"),
        ("l2c_inf.bin", "infinite"),
        ("hf_nan_st", "layers.1.mlp.up_proj.weight", "NaN"),
        ("hf_int_st", "model.layers.0.mlp.down_proj.weight", "I32", "floating point"),
        ("gguf_bloom.gguf", "general.architecture='bloom'", "supported"),
        ("gguf_inf.gguf", "layers.1.self_attn.v_proj.weight", "infinite"),
        ("gguf_int.gguf", "blk.0.ffn_down.weight", "I32", "floating point", "Q4_0"),
    )),
    # the same through the lazy loaders of --layerwise (frontend/lazy.py, lazy_gguf.py)
    *(case("checkpoint", f"{name.split('.')[0]}_layerwise",
           f"compile {{{name}}} --out {{out}} --layerwise", *needles) for name, *needles in (
        ("hf_nan_st", "layers.1.mlp.up_proj.weight", "NaN"),
        ("hf_int_st", "model.layers.0.mlp.down_proj.weight", "I32", "floating point"),
        ("gguf_inf.gguf", "layers.1.self_attn.v_proj.weight", "infinite"),
        ("gguf_int.gguf", "blk.0.ffn_down.weight", "I32", "floating point"),
    )),
    *compiles("config", (   # configs with impossible sizes, or sizes the weights do not have
        ("hf_heads_not_dividing", "does not divide hidden_size"),
        ("hf_kv_not_dividing", "num_key_value_heads", "divide"),
        ("hf_zero_layers", "num_hidden_layers = 0", "positive"),
        ("hf_vocab_zero", "vocab_size = 0"),
        ("hf_hidden_negative", "hidden_size = -64"),
        ("hf_hidden_string", "hidden_size = '64'"),
        ("hf_intermediate_zero", "intermediate_size = 0"),
        ("hf_sizes_disagree", "model.embed_tokens.weight", "config"),
        ("hf_unknown_type", "frobnicator", "supported"),
    )),
    case("config", "hf_70b_memory", "compile {hf_70b_no_weights} --out {out} --memory-limit 64",
         "needs about 828", "memory", "fewer calibration tokens"),
    case("recipe", "unknown_builtin", "compile {stories} --out {out} --recipe no_such_recipe",
         "no_such_recipe", "built-in"),
    case("recipe", "missing_file", "compile {stories} --out {out} --recipe {recipe_missing.toml}",
         "does not exist"),
    case("recipe", "unknown_target", "compile {stories} --out {out} --target fpga", "fpga",
         "supported"),
    *recipes((
        ("unknown_pass", "frobnicate", "registered passes"),
        ("unknown_setting", "bogus", "accepted"),
        ("wrong_type", "untie", "expects bool"),
        ("bad_toml", "TOML syntax error"),
        ("unknown_key", "frobnicate", "accepted"),
        ("pass_without_name", "has no name"),
        ("negative_seed", "seed must be an integer >= 0"),
        ("calibration_type", "samples must be an integer"),
        ("calibration_key", "tokens", "accepted: samples, seq_len"),
        ("not_utf8", "UTF-8"),
        ("prune_too_many", "n = 100", "1..4"),
        ("prune_all", "every layer"),
        ("prune_first", "allow_first"),
        ("prune_zero", "at least 1"),
        ("prune_past_end", "prune_layers", "layer"),
        ("prune_nothing_chosen", "no block to prune"),
        ("select_without_calibration", "calibration"),
        ("select_bad_metric", "metric", "cosine"),
        ("patch_nothing_chosen", "no block to patch"),
        ("fuse_bad_strategy", "strategy", "dense"),
        ("rotate_before_fold", "fold_norms before rotate"),
        ("rotate_int_for_bool", "r1", "expects bool"),
    )),
    *recipes((
        ("select_too_many", "n = 10", "1..4"),
        ("patch_without_prune", "prune_layers", "patch"),
        ("patch_bad_holdout", "holdout = 2.0"),
    ), cmd=_CAL),
    *recipes((
        ("quantize_int3", "bits", "4"),
        ("quantize_bits_string", "bits", "expects int"),
        ("quantize_bad_method", "magic", "rtn"),
        ("quantize_bad_group", "group_size 100", "accepted"),
        ("gptq_without_calibration", "calibration"),
    ), requires=("quantize_weights", "bits")),
    *recipes((
        ("act_roles_match_nothing", "attention.wq", "match no linear", "mlp.down_proj"),
    ), requires=("quantize_activations", "roles")),
    *(case("calibration", name, "compile {stories} --out {out} --calib {%s.txt} "
           "--recipe {recipe:select_too_many}" % name, *needles) for name, *needles in (
        ("calib_empty", "is empty"),
        ("calib_blank", "is empty"),
        ("calib_short", "fewer than one window"),
        ("calib_binary", "not UTF-8"),
        ("calib_missing", "not found"),
    )),
    # prompts and generation settings
    case("prompt", "longer_than_context", "run|{artefact}|" + "word " * 600
         + "|--max-new-tokens|2", "context is 512"),
    *(case("prompt", name, cmd, *needles) for name, cmd, *needles in (
        ("negative_max_new_tokens", "run {artefact} Once --max-new-tokens -1", "max_new_tokens"),
        ("negative_threads", "run {artefact} Once --threads -2", "threads"),
        ("negative_temperature", "run {artefact} Once --temperature -1", "temperature"),
        ("top_p_zero", "run {artefact} Once --temperature 0.5 --top-p 0", "top_p"),
        ("negative_top_k", "run {artefact} Once --temperature 0.5 --top-k -3", "top_k"),
        ("eval_window_too_long", "eval {artefact} --text {calib_ok.txt} --window 4096 -q",
         "window 4096", "context"),
        ("eval_window_one", "eval {artefact} --text {calib_ok.txt} --window 1 -q", "window"),
        ("eval_text_missing", "eval {artefact} --text {calib_missing.txt} -q", "not found"),
        ("eval_text_empty", "eval {artefact} --text {calib_empty.txt} -q", "empty"),
    )),
    # artefacts: a file removed, changed or added, an untrusted manifest
    *(case("artefact", name, _ART % name, *needles) for name, *needles in (
        ("art_removed_model", "'model.onnx.data' is missing"),
        ("art_removed_tokenizer", "'tokenizer.bin' is missing"),
        ("art_removed_manifest", "no manifest.json"),
        ("art_changed_weights", "'model.onnx.data' was changed"),
        ("art_changed_graph", "'model.onnx' was changed"),
        ("art_changed_manifest_json", "not valid JSON"),
        ("art_added_file", "'extra.py' is not listed"),
        ("art_added_dir", "'sub/x.bin' is not listed"),
        ("art_escape_parent", "'../x.bin'", "inside the artefact"),
        ("art_escape_absolute", "'/etc/passwd' is absolute"),
        ("art_symlink", "symlink"),
        ("art_format_version", "format_version 99"),
        ("art_no_io", "io"),
        ("art_bad_config", "max_position"),
        ("art_bad_tokenizer_kind", "sentencepiece", "accepted"),
        ("art_not_dir", "not a directory"),
        ("art_config_layers", "layer count", "config num_layers 7", "io num_layers 5"),
        ("art_config_kv_heads", "kv_heads 4", "num_kv_heads is 1"),
    )),
    case("artefact", "inspect_config_layers", "inspect {art_config_layers}", "layer count"),
    case("artefact", "eval_changed", "eval {art_changed_weights} --text {calib_ok.txt} -q",
         "was changed"),
    case("artefact", "inspect_changed", "inspect {art_changed_graph}", "was changed"),
    # output directories that must not be replaced
    case("output", "out_is_foreign_dir", "compile {stories} --out {hf}", "not a splice artefact",
         "refusing"),
    case("output", "out_is_file", "compile {stories} --out {calib_short.txt}", "not a directory"),
]


# -- generated over every argument of every command -------------------------------------------
# A good command line per command; each argument that names a file or a directory, or holds a
# number, is then given every bad value of its kind (the CLI's own tables say which arguments
# those are), so a new argument is covered by being in the table.
BASES = {
    "compile": "compile {stories} --out {out}",
    "run": "run {artefact} Once --max-new-tokens 2 --temperature 0.5",
    "eval": "eval {artefact} --text {calib_ok.txt} --max-tokens 600",
    "inspect": "inspect {stories}",
    "debug": "debug {stories} --out {out}",
    "bisect": "bisect {stories} --recipe none --metric kl --tolerance 0.1 --out {out}",
}
# arguments the Python API takes too (test_bad_inputs.call_api); the rest are CLI-only
API_FORMS = {"compile": {"out", "calib", "dump_ir", "seed", "memory_limit", "threads"},
             "run": {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "threads",
                     "lookahead"},
             "eval": {"text", "max_tokens", "window"}}
BAD_INPUT_FILES = (("{a_directory}", "is a directory"), ("{calib_missing.txt}", "not found"))
BAD_OUTPUTS = (("{a_file.txt}", "not a directory"), ("{a_file.txt}/sub", "not a directory"),
               ("/proc/splice-no-such-dir/out", "cannot write"))


def _bad_numbers(check, limits: dict) -> list[str]:
    """Values of the right type but out of range (argparse itself refuses the wrong type)."""
    from splice import checks

    lo, above, hi = limits.get("minimum"), limits.get("above"), limits.get("maximum")
    if check is checks.integer:
        return [str(lo - 1)] if lo is not None else []
    bad = ["inf", "nan"]
    bad += [str(lo - 0.5)] if lo is not None else []
    bad += [str(above)] if above is not None else []
    bad += [str(hi + 0.5)] if hi is not None else []
    return bad


def generated() -> list[Case]:
    from splice.cli import build_parser
    from splice.cli_args import INPUT_FILES, NUMBERS, OUTPUT_DIRS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    out: list[Case] = []
    for command, base in BASES.items():
        for action in sub[command]._actions:
            dest, flag = action.dest, (action.option_strings or [""])[-1]
            cli_only = dest not in API_FORMS.get(command, ())
            rows: list[tuple[str, str, tuple[str, ...]]] = []
            # needles that the CLI's message and the API's share: the argument's name as the
            # CLI's table writes it without the flag ("calibration text"), or the keyword
            if dest in INPUT_FILES:
                what = INPUT_FILES[dest].split(" (")[0]
                rows = [(v, "path", (what, need)) for v, need in BAD_INPUT_FILES]
            elif dest in OUTPUT_DIRS:
                what = OUTPUT_DIRS[dest].split(" (")[0]
                rows = [(v, "output", (what, need)) for v, need in BAD_OUTPUTS]
                rows.append(("|", "output", (what, "empty path")))
            elif dest in NUMBERS:
                check, what, limits = NUMBERS[dest]
                name = dest if dest in what else dest.split("_")[-1]
                rows = [(v, "number", (name,)) for v in _bad_numbers(check, limits)]
            for i, (value, category, needles) in enumerate(rows):
                cmd = f"{base.replace(' ', '|')}|{flag}|{value.strip('|')}"
                out.append(case(category, f"gen_{command}_{dest}_{i}", cmd, *needles,
                                cli_only=cli_only))
    return out


CASES += generated()
# a built-in recipe on the README's tiny model (64 inputs, groups of 128): it compiles with
# smaller groups or is refused on one line naming the group and the narrow linears
CASES.append(case("recipe", "w4_rtn_on_64_inputs", "compile {stories} --out {out} --recipe w4_rtn",
                  "group_size 128", "in_features", may_succeed=True))
CASES += [
    # text that is not valid Unicode: what Python makes of undecodable command-line bytes
    case("prompt", "prompt_lone_surrogate", "run|{artefact}|Once \udcff upon|--max-new-tokens|2",
         "not valid Unicode"),
    case("output", "out_empty_dir_parent_is_file", "compile {stories} --out {a_file.txt}/x/y",
         "not a directory"),
]


def placeholders(c: Case) -> set[str]:
    """The {names} a case's argv refers to."""
    import re

    return {m for a in c.argv for m in re.findall(r"\{([^{}]+)\}", a)}


def resolve(c: Case, paths: dict[str, Path], out: Path, recipe_dir: Path) -> list[str]:
    """The case's argv with its placeholders replaced by real paths (recipes written on demand;
    latin-1, so that the one non-UTF-8 recipe is written as the bad bytes it stands for)."""
    argv = []
    for a in c.argv:
        for name in placeholders(Case("", "", (a,), ())):
            if name == "out":
                value = out
            elif name.startswith("recipe:"):
                recipe = name[len("recipe:"):]
                value = recipe_dir / f"{recipe}.toml"
                if not value.exists():
                    value.write_bytes(RECIPES[recipe].encode("latin-1"))
            else:
                value = paths[name]
            a = a.replace("{" + name + "}", str(value))
        argv.append(a)
    return argv
