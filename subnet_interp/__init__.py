"""subnet_interp: find, attach and analyse weight-level subnetworks.

``import subnet_interp as si``. Importing this package imports neither transformer_lens nor
nnsight; adapters load their library when a model of that family is first seen.
"""

from . import analysis, methods, objectives, probing, testing
from ._ablations import Ablation, MeanAblation, ReinitAblation, ResampleAblation
from ._find import find
from ._fingerprint import fingerprint
from ._loop import NonFiniteLossError
from ._masked import delta_applied, masked
from ._patching import PatchAblation
from ._subnetwork import Subnetwork
from ._targets import targets
from ._types import NotFoundError, Target
from .methods import FindResult, random_like

__version__ = "0.1.0"

__all__ = [
    "Ablation",
    "MeanAblation",
    "ReinitAblation",
    "PatchAblation",
    "ResampleAblation",
    "FindResult",
    "NonFiniteLossError",
    "NotFoundError",
    "Subnetwork",
    "Target",
    "analysis",
    "delta_applied",
    "find",
    "fingerprint",
    "masked",
    "methods",
    "objectives",
    "probing",
    "random_like",
    "targets",
    "testing",
]
