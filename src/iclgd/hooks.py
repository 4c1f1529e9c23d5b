"""Named hook points on the real model, from Python (re-exported from :mod:`iclgd.core.hooks`)."""

from iclgd.core.hooks import HOOK_POINTS, Recorder, Recording, record  # noqa: F401

__all__ = ["HOOK_POINTS", "Recorder", "Recording", "record"]
