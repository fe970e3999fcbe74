"""Passes: one file per pass at the top of this package (`<verb>_<noun>.py` defining `<Name>Pass`),
the pass infrastructure in `infra/` (PassBase, PassContext, PassManager, instruments, the registry,
the layer-by-layer driver, tracing and bisection) and the numerics several passes share in
`numerics/` (rotations, patch fits, calibration stages, the GPTQ and RTN solvers).

The built-in passes are the explicit imports below (no directory scan): importing any part of
splice.passes registers exactly these, and nothing else (the frontend in particular) is imported to
find them. A new pass file is added to this list.
"""

from .infra.base import PassBase, PassContext, PassError, PassResult
from .infra.instruments import (DumpInstrument, Instrument, NumericCheckError,
                                NumericCheckInstrument, PassCheckError, TimingInstrument,
                                VerifyInstrument)
from .infra.manager import FixedPointError, PassFailure, PassInputFailure, PassManager
from .infra.registry import PASSES, describe_passes, get_pass, make_pass, register_pass

# the built-in passes, in alphabetical order (each registers itself with @register_pass)
from .absorb_post_norm import AbsorbPostNormPass
from .center_inputs import CenterInputsPass
from .distill_patch import DistillPatchPass
from .estimate_patch import EstimatePatchPass
from .fold_norms import FoldNormsPass
from .fuse_patch import FusePatchPass
from .prune_layers import PruneLayersPass
from .quantize_activations import QuantizeActivationsPass
from .quantize_kv_cache import QuantizeKVCachePass
from .quantize_weights import QuantizeWeightsPass
from .rotate import RotatePass
from .rotate_inputs import RotateInputsPass
from .select_layers import SelectLayersPass

BUILTIN_PASSES = (
    AbsorbPostNormPass, CenterInputsPass, DistillPatchPass, EstimatePatchPass, FoldNormsPass,
    FusePatchPass, PruneLayersPass, QuantizeActivationsPass, QuantizeKVCachePass,
    QuantizeWeightsPass, RotateInputsPass, RotatePass, SelectLayersPass,
)

__all__ = [
    "AbsorbPostNormPass", "BUILTIN_PASSES", "CenterInputsPass", "DistillPatchPass",
    "DumpInstrument",
    "EstimatePatchPass", "FixedPointError", "FoldNormsPass", "FusePatchPass", "Instrument",
    "NumericCheckError", "NumericCheckInstrument", "PASSES", "PassBase", "PassCheckError",
    "PassContext", "PassError", "PassFailure", "PassInputFailure", "PassManager", "PassResult",
    "PruneLayersPass", "QuantizeActivationsPass", "QuantizeKVCachePass", "QuantizeWeightsPass",
    "RotateInputsPass", "RotatePass", "SelectLayersPass", "TimingInstrument", "VerifyInstrument",
    "describe_passes",
    "get_pass", "make_pass", "register_pass",
]
