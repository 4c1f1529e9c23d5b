"""One registry of named hook points, read (or edited) without touching model code (TransformerLens-style).

Hook points, per layer ``l`` (what the tensor is, where it is taken, its shape):
  ``attn_in.{l}``    the attention's input (the output of its input norm in pre-norm
                     blocks; the block's input in OLMo-2's post-norm blocks)         (B, T, d_model)
  ``attn_heads.{l}`` the heads' outputs: input of the output projection             (B, T, H·d_head)
  ``attn_out.{l}``   the attention output: output of the output projection, before
                     the residual and dropout                                       (B, T, d_model)
  ``block_in.{l}``   the block's input (residual stream)                            (B, T, d_model)
  ``block_out.{l}``  the block's output (residual stream)                           (B, T, d_model)
Captures (:mod:`iclgd.engine.capture`), the dual-form check (:mod:`iclgd.engine.dual`) and layer-causal
finetuning (:mod:`iclgd.engine.finetune`) all take their tensors here. Queries and keys are rebuilt from
``attn_in`` with the adapter (:func:`iclgd.core.models.qkv`), so one mechanism serves every architecture; the
captures read keys and values from the scoring pass's cache instead where the load-time check found it holds the
same (``LoadedModel.cache_kv``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

import torch

from iclgd.core.models import LoadedModel

# name -> (the module of layer l, whether the point is that module's "input" or its "output")
HOOK_POINTS: dict[str, tuple[Callable[[LoadedModel, int], torch.nn.Module], str]] = {
    "attn_in": (lambda lm, l: lm.attention(l), "input"),
    "attn_heads": (lambda lm, l: lm.o_proj(l), "input"),
    "attn_out": (lambda lm, l: lm.o_proj(l), "output"),
    "block_in": (lambda lm, l: lm.blocks()[l], "input"),
    "block_out": (lambda lm, l: lm.blocks()[l], "output"),
}


def _first_input(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else next(iter(kwargs.values()))


class Recorder:
    """Context manager: while active, ``self.acts['attn_in.3']`` etc. hold the last forward's tensors.

    ``edit`` maps a point of kind "input" to a function that replaces the module's input (e.g.
    ``{"block_in": torch.Tensor.detach}`` cuts the gradient between blocks).
    """

    def __init__(self, lm: LoadedModel, points=("attn_in", "attn_out"), detach: bool = True,
                 edit: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 layers: Iterable[int] | None = None):
        unknown = [p for p in [*points, *(edit or {})] if p not in HOOK_POINTS]
        if unknown:
            raise ValueError(f"unknown hook point(s) {unknown}; expected {', '.join(HOOK_POINTS)}")
        self.lm, self.points, self.detach, self.edit = lm, points, detach, edit or {}
        self.layers = list(range(lm.n_layers)) if layers is None else sorted(set(layers))
        self.acts: dict[str, torch.Tensor] = {}
        self._handles = []

    def _keep(self, name):
        return lambda t: self.acts.__setitem__(name, t.detach() if self.detach else t)

    def _hook(self, point: str, name: str):
        keep = self._keep(name) if point in self.points else (lambda t: None)
        if HOOK_POINTS[point][1] == "output":
            def hook(module, args, output):
                keep(output[0] if isinstance(output, tuple) else output)
            return hook
        fn = self.edit.get(point)

        def pre_hook(module, args, kwargs):
            x = _first_input(args, kwargs)
            if fn is not None:
                x = fn(x)
                if args:
                    args = (x, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": x}
            keep(x)
            return (args, kwargs) if fn is not None else None
        return pre_hook

    def __enter__(self):
        for l in self.layers:
            for point in [*self.edit, *(p for p in self.points if p not in self.edit)]:
                module_of, kind = HOOK_POINTS[point]
                hook, module = self._hook(point, f"{point}.{l}"), module_of(self.lm, l)
                self._handles.append(module.register_forward_hook(hook) if kind == "output" else
                                     module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def parse_names(lm: LoadedModel, names: Iterable[str]) -> tuple[list[str], list[int], set[str]]:
    """``["attn_out.3", "block_in"]`` -> the points and layers to hook and the names they yield (a point without
    ``.l``: every layer); an unknown point or a layer outside the model is a one-line error."""
    from iclgd.core.errors import IclgdError

    points, layers, wanted = [], set(), set()
    for n in names:
        point, _, layer = str(n).partition(".")
        if point not in HOOK_POINTS:
            raise IclgdError(f"hook point {n!r}: unknown (expected one of {', '.join(HOOK_POINTS)}, optionally "
                             f"with .LAYER, e.g. attn_out.3)")
        if layer and not (layer.isdigit() and int(layer) < lm.n_layers):
            raise IclgdError(f"hook point {n!r}: layer {layer} is not one of the model's 0..{lm.n_layers - 1}")
        points.append(point) if point not in points else None
        these = [int(layer)] if layer else range(lm.n_layers)
        layers.update(these)
        wanted.update(f"{point}.{l}" for l in these)
    return points, sorted(layers), wanted


class Recording(Recorder):
    """:class:`Recorder` limited to the names asked for: ``rec["attn_out.3"]`` after a forward pass."""

    def __init__(self, lm: LoadedModel, names: Iterable[str], detach: bool = True):
        points, layers, self.names = parse_names(lm, [names] if isinstance(names, str) else names)
        super().__init__(lm, points=tuple(points), detach=detach, layers=layers)

    def _keep(self, name):
        keep = super()._keep(name)
        return keep if name in self.names else (lambda t: None)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"{name!r} was not recorded (recorded: {', '.join(sorted(self.names))})")
        if name not in self.acts:
            raise KeyError(f"{name!r}: no forward pass has run inside the block yet")
        return self.acts[name]

    def keys(self) -> list[str]:
        return sorted(self.acts)


def record(lm: LoadedModel, names: Iterable[str], detach: bool = True) -> Recording:
    """Record named hook points during the forward passes run inside the ``with`` block (see the module's
    docstring for the points and their shapes)::

        with iclgd.hooks.record(lm, ["attn_out.3", "block_out"]) as rec:
            lm.model(input_ids=ids)
        rec["attn_out.3"]        # (B, T, d_model), the last forward pass's
    """
    return Recording(lm, names, detach)
