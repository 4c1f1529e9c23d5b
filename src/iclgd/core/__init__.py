"""Layer 0: tasks, models (the adapter), hooks, metrics, io. Imports nothing else of iclgd."""
