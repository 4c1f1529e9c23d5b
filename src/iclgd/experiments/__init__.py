"""Layer 2: the experiments (eval, compare, dual, synthetic, momentum) and the sweep that dispatches them."""
