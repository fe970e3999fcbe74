"""ONNX Runtime session settings: the manifest's session section checked, and the options and
execution providers a session opens with (the manifest's defaults, overridden by the caller)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from splice.errors import ArtefactError, InputError

log = logging.getLogger(__name__)

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_section(path: Path, manifest: dict) -> dict[str, Any]:
    """The manifest's session defaults, checked. Thread counts above this machine's CPU count are
    lowered to it: an artefact built on a large server still runs well on a small device, and an
    untrusted one cannot make the runtime start threads by the thousand."""
    cfg = manifest.get("session") or {}
    if not isinstance(cfg, dict):
        raise ArtefactError(f"artefact {path}: the manifest's session section is not a table")
    level = cfg.get("graph_optimization", "all")
    if not isinstance(level, str) or level not in LEVELS:
        raise ArtefactError(f"artefact {path}: the manifest's session.graph_optimization is "
                            f"{level!r}; accepted: {', '.join(LEVELS)}")
    out: dict[str, Any] = {"graph_optimization": level}
    cpus = os.cpu_count() or 1
    for key, default in (("intra_op_num_threads", 0), ("inter_op_num_threads", 1)):
        value = cfg.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ArtefactError(f"artefact {path}: the manifest's session.{key} is {value!r}; "
                                "expected an integer >= 0")
        out[key] = min(value, cpus)
    wanted = cfg.get("providers") or ["CPUExecutionProvider"]
    if not isinstance(wanted, list) or not all(isinstance(p, str) for p in wanted):
        raise ArtefactError(f"artefact {path}: the manifest's session.providers is {wanted!r}; "
                            "expected a list of ONNX Runtime execution provider names")
    out["providers"] = wanted
    spinning = cfg.get("allow_spinning", True)
    if not isinstance(spinning, bool):
        raise ArtefactError(f"artefact {path}: the manifest's session.allow_spinning is "
                            f"{spinning!r}; expected true or false")
    out["allow_spinning"] = spinning
    return out


def session_options(cfg: dict, graph_optimization: bool | str | None,
                     threads: int | None, spinning: bool | None = None) -> ort.SessionOptions:
    if graph_optimization is None:
        level = cfg.get("graph_optimization", "all")
    elif isinstance(graph_optimization, bool):
        level = "all" if graph_optimization else "disable"
    else:
        level = graph_optimization
    if not isinstance(level, str) or level not in LEVELS:
        raise InputError(f"graph_optimization={graph_optimization!r}; accepted: True, False, "
                         f"{', '.join(LEVELS)}")
    threads = cfg.get("intra_op_num_threads", 0) if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise InputError(f"threads={threads!r}; expected an integer >= 0 (0: ONNX Runtime "
                         "chooses)")
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = cfg.get("inter_op_num_threads", 1)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spinning = cfg.get("allow_spinning", True) if spinning is None else spinning
    if not isinstance(spinning, bool):
        raise InputError(f"spinning={spinning!r}; expected True, False or None (the manifest's)")
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def providers_for(cfg: dict, providers: Sequence[str] | None) -> list[str]:
    available = ort.get_available_providers()
    if providers is not None:
        if isinstance(providers, str) or not all(isinstance(p, str) for p in providers):
            raise InputError(f"providers={providers!r}; expected a list of execution provider "
                             f"names from {available}")
        missing = [p for p in providers if p not in available]
        if missing or not providers:
            raise InputError(f"providers {list(providers)}: not available {missing}; this "
                             f"onnxruntime has {available}")
        return list(providers)
    wanted = list(cfg["providers"])
    chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    if chosen != wanted:
        log.warning("execution providers %s are not available; running on %s",
                    [p for p in wanted if p not in chosen], chosen)
    return chosen
