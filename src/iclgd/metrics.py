"""The paper's metrics as pure functions on arrays (re-exported from :mod:`iclgd.core.metrics`)."""

from iclgd.core.metrics import *  # noqa: F401,F403
from iclgd.core.metrics import __doc__ as _core_doc

__doc__ = (__doc__ or "") + "\n\n" + (_core_doc or "")

# the paper's names for the per-layer figures (means over examples)
simaou = simaou_per_layer  # noqa: F405
simam = simam_per_layer  # noqa: F405
kendall = kendall_per_layer  # noqa: F405
