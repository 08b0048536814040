"""Plain-PyTorch tile encoders for cards whose architecture neither timm nor ``transformers``
provides (the ``module`` builder). Each module of this package registers its constructors
with :func:`register`; ``NETS[name](**kwargs)`` builds one. A network's ``forward(x)`` takes
the normalised ``(N, 3, H, W)`` float batch and returns the card's ``(N, D)`` embedding.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import torch

NETS: dict[str, Callable[..., torch.nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., torch.nn.Module]], Callable[..., torch.nn.Module]]:
    """Decorator: ``NETS[name] = constructor``."""

    def deco(fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        if name in NETS:
            raise ValueError(f"network {name!r} registered twice")
        NETS[name] = fn
        return fn

    return deco


for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
