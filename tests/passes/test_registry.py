"""The pass registry (settings validation, descriptions) and recipes (TOML, built-ins, errors)."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar, Literal

import pytest

from splice.errors import InputError
from splice.passes import PassBase, PassError, PassResult
from splice.passes.infra import registry
from splice.passes.fold_norms import FoldNormsPass
from splice.passes.infra.registry import describe_passes, get_pass, make_pass, register_pass
from splice.recipe import Recipe


@pytest.fixture
def private_registry(monkeypatch):
    """Register test passes on a copy of the registry, so they do not leak into other tests."""
    registry.registered()
    monkeypatch.setattr(registry, "PASSES", dict(registry.PASSES))

    @register_pass
    @dataclasses.dataclass(frozen=True)
    class TunePass(PassBase):
        """Exercise every setting type.

        Second paragraph, not shown by describe_passes.
        """

        name: ClassVar[str] = "tune"
        layers: tuple[int, ...] = ()
        ratio: float = 0.5
        bits: int = 4
        label: str | None = None
        mode: Literal["fast", "exact"] = "fast"
        weights: dict[str, float] = dataclasses.field(default_factory=dict)

        def call(self, module, ctx):
            return PassResult(module, False)

    return TunePass


def test_make_pass_builds_a_registered_pass():
    assert get_pass("fold_norms") is FoldNormsPass
    assert make_pass("fold_norms", {}) == FoldNormsPass()
    assert make_pass("fold_norms", {"untie": False}) == FoldNormsPass(untie=False)


def test_settings_are_coerced_where_lossless(private_registry):
    p = make_pass("tune", {"layers": [1, 2], "ratio": 1, "label": "x", "mode": "exact",
                           "weights": {"a": 2}})
    assert p == private_registry(layers=(1, 2), ratio=1.0, label="x", mode="exact",
                                 weights={"a": 2.0})
    assert isinstance(p.ratio, float) and isinstance(p.layers, tuple)


@pytest.mark.parametrize("settings, message", [
    ({"bitz": 4}, r"pass 'tune': unknown setting 'bitz'; accepted: layers, ratio, bits, label, "
                  r"mode, weights"),
    ({"bits": "four"}, r"pass 'tune': setting 'bits' expects int, got str 'four'"),
    ({"bits": True}, r"setting 'bits' expects int, got bool True"),
    ({"bits": 4.5}, r"setting 'bits' expects int, got float 4.5"),
    ({"ratio": "half"}, r"setting 'ratio' expects float, got str 'half'"),
    ({"layers": [1, "x"]}, r"setting 'layers' expects tuple\[int, \.\.\.\], got list \[1, 'x'\]"),
    ({"label": 3}, r"setting 'label' expects str \| None, got int 3"),
    ({"mode": "slow"}, r"setting 'mode' expects 'fast' \| 'exact', got str 'slow'"),
    ({"weights": [1]}, r"setting 'weights' expects dict\[str, float\]"),
])
def test_bad_settings_raise_naming_setting_type_and_value(private_registry, settings, message):
    with pytest.raises(PassError, match=message):
        make_pass("tune", settings)


def test_unknown_pass_lists_the_registered_ones():
    with pytest.raises(PassError,
                       match=r"unknown pass 'fold_norm'; registered passes: .*fold_norms"):
        make_pass("fold_norm", {})
    with pytest.raises(PassError, match=r"unknown setting 'x'; accepted: untie"):
        make_pass("fold_norms", {"x": 1})


def test_register_pass_refuses_bad_classes(private_registry):
    with pytest.raises(TypeError, match="taken by"):
        @register_pass
        @dataclasses.dataclass(frozen=True)
        class Other(PassBase):
            name: ClassVar[str] = "tune"

    with pytest.raises(TypeError, match="frozen dataclass"):
        @register_pass
        @dataclasses.dataclass
        class Mutable(PassBase):
            name: ClassVar[str] = "mutable"

    with pytest.raises(TypeError, match="class attribute `name`"):
        register_pass(dataclasses.dataclass(frozen=True)(type("Nameless", (PassBase,), {})))


def test_describe_passes_lists_settings_and_summary(private_registry):
    text = describe_passes()
    assert "fold_norms (exact)" in text and "untie: bool = True" in text
    assert "Fold every pre-norm's gamma" in text
    assert "tune (lossy)" in text and "Exercise every setting type." in text
    assert "Second paragraph" not in text
    assert "layers: tuple[int, ...] = ()" in text and "label: str | None = None" in text


# -- recipes -----------------------------------------------------------------------------------

RECIPE = """
name = "fold-twice"
description = "fold, then fold again"
seed = 3

[calibration]
samples = 8
seq_len = 64

[[pass]]
name = "fold_norms"

[[pass]]
name = "fold_norms"
untie = false
"""


def test_recipe_reads_toml_text_and_files(tmp_path):
    r = Recipe.from_toml(RECIPE)
    assert r.name == "fold-twice" and r.seed == 3
    assert (r.calibration_samples, r.calibration_seq_len) == (8, 64)
    assert r.build() == [FoldNormsPass(), FoldNormsPass(untie=False)]
    path = tmp_path / "mine.toml"
    path.write_text(RECIPE.replace('name = "fold-twice"\n', ""))
    from_file = Recipe.from_toml(path)
    assert from_file.name == "mine" and from_file.passes == r.passes
    assert Recipe.from_toml(str(path)) == from_file


def test_recipe_round_trips_through_toml_and_dict():
    r = Recipe.from_toml(RECIPE)
    assert Recipe.from_toml(r.to_toml()) == r
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    rest = {"max_gain": 2.5, "probe_tokens": 128}
    assert d["passes"] == [{"name": "fold_norms", "settings": {"untie": True, **rest}},
                           {"name": "fold_norms", "settings": {"untie": False, **rest}}]
    assert Recipe.from_dict(d) == r


def test_calibration_precision_reaches_the_passes_context():
    import torch

    from splice.api import run_passes
    from tests.tiny import tiny_module

    assert Recipe.from_toml(RECIPE).precision == torch.float64  # the default
    r = Recipe.from_toml(RECIPE.replace("[calibration]", '[calibration]\nprecision = "float32"'))
    assert r.precision == torch.float32 and r.to_dict()["calibration"]["precision"] == "float32"
    assert Recipe.from_toml(r.to_toml()) == r
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Probe(PassBase):
        name: ClassVar[str] = "probe"

        def call(self, module, ctx):
            seen.append(ctx.precision)
            return PassResult(module, False)

    run_passes(tiny_module(), Recipe("p", (Probe(),), calibration_precision="float32"))
    assert seen == [torch.float32]


def test_recipe_round_trip_keeps_every_setting_type(private_registry):
    r = Recipe("t", (("tune", {"layers": [3, 1], "ratio": 0.25, "label": 'say "hi"',
                               "weights": {"q.k": 1.5}}),))
    back = Recipe.from_toml(r.to_toml())
    assert back == r and back.passes[0].weights == {"q.k": 1.5}


def test_recipe_accepts_pass_instances_and_pairs():
    r = Recipe("mixed", (FoldNormsPass(untie=False), ("fold_norms", {}), "fold_norms"))
    assert r.build() == [FoldNormsPass(untie=False), FoldNormsPass(), FoldNormsPass()]


def test_builtin_recipes_and_resolve(tmp_path):
    assert Recipe.named("none").build() == []
    assert Recipe.named("fold_norms").build() == [FoldNormsPass(untie=False)]
    assert Recipe.resolve("fold_norms") == Recipe.named("fold_norms")
    r = Recipe.named("none")
    assert Recipe.resolve(r) is r
    (tmp_path / "r.toml").write_text(RECIPE)
    assert Recipe.resolve(str(tmp_path / "r.toml")).name == "fold-twice"
    with pytest.raises(PassError, match=r"unknown recipe 'quantize'; built-in recipes: "
                                        r"balanced, .*fold_norms, .*none, "):
        Recipe.named("quantize")


@pytest.mark.parametrize("text, message", [
    ('[[pass]]\nname = "fold_norm"', r"unknown pass 'fold_norm'; registered passes: .*fold_norms"),
    ('[[pass]]\nname = "fold_norms"\nuntie = 1', r"setting 'untie' expects bool, got int 1"),
    ('[[pass]]\nname = "fold_norms"\nuntied = true', r"unknown setting 'untied'; accepted: untie"),
    ('[[pass]]\nuntie = true', r"\[\[pass\]\] number 1 has no name"),
    ('name = "x"\npasses = 3', r"passes are \[\[pass\]\] tables"),
    ('name = "x"\nsteps = 3', r"unknown key\(s\) 'steps'; accepted: name, description"),
    ('[calibration]\ntokens = 3', r"unknown calibration key\(s\) 'tokens'; accepted: samples"),
    ('[calibration]\nprecision = "float16"', r"calibration precision 'float16'; accepted: "
                                             r"float64, float32"),
    ('seed = -1', r"seed must be an integer >= 0, got -1"),
    ('name = ""', r"recipe name must be a non-empty string"),
    ('name = "x"\n[[pass]]\nname = "fold_norms"\nuntie = tru', r"TOML syntax error: .*line 4"),
])
def test_bad_recipes_raise_one_line_pass_errors(text, message):
    with pytest.raises(PassError, match=message) as info:
        Recipe.from_toml(text)
    assert isinstance(info.value, InputError) and "\n" not in str(info.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(PassError, match=r"recipe file '.*nope\.toml' does not exist"):
        Recipe.from_toml(tmp_path / "nope.toml")
    with pytest.raises(PassError,
                       match=r"does not exist; built-in recipes: balanced, .*fold_norms, .*none, "):
        Recipe.resolve("fold")


def test_bad_recipe_objects():
    with pytest.raises(PassError, match=r"pass 1 is 42; give \(pass name, settings dict\)"):
        Recipe("x", (42,))
    with pytest.raises(PassError, match="passes must be a list"):
        Recipe("x", "fold_norms")
    with pytest.raises(PassError, match="give a .toml file|a Recipe, a built-in name"):
        Recipe.resolve(3)
