"""subnet_interp: find, attach and analyse weight-level subnetworks.

``import subnet_interp as si``. Importing this package imports neither transformer_lens nor
nnsight; adapters load their library when a model of that family is first seen.
"""

from ._attach import Ablation, masked
from ._fingerprint import fingerprint
from ._registry import methods
from ._subnetwork import Subnetwork
from ._targets import targets
from ._types import Target

__version__ = "0.1.0"

__all__ = [
    "Ablation",
    "Subnetwork",
    "Target",
    "fingerprint",
    "masked",
    "methods",
    "targets",
]
