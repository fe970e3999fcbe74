"""splice's graph IR: Value / Node / Graph / Module, op definitions, verifier, text form,
reference interpreter, serialisation and a networkx view."""

from .core import (DTYPES, Dim, Graph, IRError, Module, ModelConfig, Node, Shape, Tokenizer, Value,
                   emit)
from .interpreter import Interpreter, default_feeds, past_from_present, run_logits
from .opdef import OPS, OpDef, get_op
# the op declarations: importing them fills opdef.OPS (explicitly here, for every part of splice.ir)
from . import ops, qops  # noqa: F401  (isort: skip)
from .parser import ParseError, parse_graph
from .printer import print_graph
from .serialize import load_module, save_module
from .verify import VerifyError, verify

__all__ = [
    "DTYPES", "Dim", "Graph", "IRError", "Interpreter", "Module", "ModelConfig", "Node", "OPS",
    "OpDef", "ParseError", "Shape", "Tokenizer", "Value", "VerifyError", "default_feeds", "emit",
    "get_op", "load_module", "parse_graph", "past_from_present", "print_graph", "run_logits",
    "save_module", "verify",
]
