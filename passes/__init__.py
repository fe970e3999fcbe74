"""Pass infrastructure (PassBase, PassResult, PassContext, PassManager, instruments, the registry)
and one file per pass (`<verb>_<noun>.py`, registered by name on first registry look-up)."""

from .base import PassBase, PassContext, PassError, PassResult
from .instruments import (DumpInstrument, Instrument, NumericCheckError, NumericCheckInstrument,
                          PassCheckError, TimingInstrument, VerifyInstrument)
from .manager import FixedPointError, PassFailure, PassInputFailure, PassManager
from .registry import PASSES, describe_passes, get_pass, make_pass, register_pass

__all__ = [
    "DumpInstrument", "FixedPointError", "Instrument", "NumericCheckError", "NumericCheckInstrument",
    "PASSES", "PassBase", "PassCheckError", "PassContext", "PassError", "PassFailure",
    "PassInputFailure", "PassManager", "PassResult", "TimingInstrument", "VerifyInstrument",
    "describe_passes", "get_pass", "make_pass", "register_pass",
]
