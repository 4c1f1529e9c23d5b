"""Layer 1: option scoring with prefix reuse, finetuning, the dual-form math, momentum attention, LM training."""
