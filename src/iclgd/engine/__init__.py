"""Layer 1: option scoring with prefix reuse, finetuning, the dual-form math, momentum attention, LM training."""

from iclgd.engine import momentum as _momentum  # noqa: F401  (registers: models saved with momentum load with it)
