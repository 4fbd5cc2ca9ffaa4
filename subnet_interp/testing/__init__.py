"""Conformance checks for new methods and model families, shipped with the library
(``si.testing``), as scikit-learn ships ``check_estimator``.

``check_method(MyMethod)`` runs a method through the contract every registered method keeps:
it is a frozen dataclass of documented hyper-parameters, refuses bad ones before touching the
model, recovers a planted subnetwork, leaves the model bit-exactly as it was, records its run in
the subnetwork's ``meta``, saves and loads, is deterministic under a seed and (for
learnable-mask methods) resumes from a checkpoint exactly. Which task and which checks apply is
read from the method's declared properties (``trains_weights``, ``needs_steps``,
``learns_from_loss``, ``returns_delta``, being a :class:`~subnet_interp.methods.MaskMethod`),
never from its name.

``check_adapter(model, inputs)`` does the same for a model as an adapter resolves it: exact
canonical layouts, masks that equal editing the weights by hand, bit-exact restore (also after an
exception), a stable fingerprint, and gradients that reach every target.

Both raise :class:`ConformanceError` (an ``AssertionError``, so pytest reports it as a failure)
naming the check, what was seen and what was expected; on success they return a report.
"""

from ._adapters import AdapterReport, check_adapter
from ._common import ConformanceError
from ._methods import MethodReport, check_method

__all__ = ["AdapterReport", "ConformanceError", "MethodReport", "check_adapter", "check_method"]
