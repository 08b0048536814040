"""What the attention-pooling slide encoders (CHIEF, MADELEINE, FEATHER, PRISM) share: where a
released checkpoint lives, how it is loaded strictly, deterministic random weights of the
exact architecture (tests, benchmarks), and the numpy-in / numpy-out encoder around a net.

A *net* here is an ``nn.Module`` with an ``in_dim`` attribute whose ``forward(tiles)`` maps one
slide's ``(N, in_dim)`` float32 tile embeddings to its ``(out_dim,)`` slide embedding; these
encoders use no tile coordinates.

**Loading contract** (:func:`load_release`): the released file is read with
``weights_only=True`` (a ``module.`` prefix left by DDP is removed, as the official loaders
do); entries under the release's ``ignored_prefixes`` (parts the official slide-embedding path
drops or never runs) are set aside; every other key must carry ``key_prefix`` and, without
it, match the net's state dict exactly in names and shapes. A net that shares one module
under several names (PRISM's Perceiver) may find a shared tensor under any of its names;
copies present under several names must be equal.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pathray.encoders.checkpoint import file_sha256, load_into, read_state_dict
from pathray.encoders.hub import HUB_PREFIXES, download_hub_file
from pathray.errors import WeightsCorruptError, WeightsMismatchError, WeightsUnavailableError


@dataclass(frozen=True)
class Release:
    """A released slide-encoder checkpoint, as its authors publish it."""

    architecture: str  # pathray's name for the exact architecture
    filename: str  # the released weights file
    hub_repo: str | None  # HF hub repo holding it; None when it is not on the hub
    obtain: str  # where and how to get the file (shown when it is missing)
    key_prefix: str = ""  # prefix the release puts before the net's keys
    ignored_prefixes: tuple[str, ...] = ()  # release entries the slide embedding does not use
    gated: bool = True


def resolve_weights(release: Release, source: str | os.PathLike | None) -> tuple[str, str, str]:
    """``(local file, source label, fingerprint)`` for ``source``: ``None`` (the release's hub
    repo), ``hf-hub:org/name[@rev]``, the released file itself or a directory holding it."""
    if source is None and release.hub_repo is None:
        raise WeightsUnavailableError(
            f"{release.architecture}: no default download; {release.obtain}, then pass "
            f"--weights PATH (the {release.filename} file or its directory)"
        )
    text = HUB_PREFIXES[0] + str(release.hub_repo) if source is None else os.fspath(source)
    for prefix in HUB_PREFIXES:
        if text.startswith(prefix):
            repo = text[len(prefix) :]
            path, fingerprint = download_hub_file(release.architecture, repo, release.filename, gated=release.gated)
            return path, f"hf-hub:{repo}", fingerprint
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / release.filename
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{release.architecture}: weights {text!r} not found: expected the released "
            f"{release.filename} (or a directory holding it); {release.obtain}"
        )
    return str(path), str(path), "sha256:" + file_sha256(path)


def check_config(weights_path: str, config_name: str, expected: dict[str, Any]) -> None:
    """Refuse a release config file ``config_name`` next to the weights whose architecture fields
    differ from ``expected`` (fields it lacks are not checked); no such file: nothing to check."""
    path = Path(weights_path).with_name(config_name)
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsCorruptError(f"cannot parse {path}: {exc}") from exc
    wrong = {k: config[k] for k, v in expected.items() if k in config and config[k] != v}
    if wrong:
        raise WeightsMismatchError(f"{path} describes another architecture ({wrong}); pathray implements {expected}")


def load_release(net: nn.Module, release: Release, path: str) -> nn.Module:
    """Strictly load the released file at ``path`` into ``net`` (see the module docstring);
    ``WeightsMismatchError`` names what does not fit."""
    what = f"{release.architecture} weights {path}"
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(release.ignored_prefixes)}
    foreign = sorted(k for k in state if not k.startswith(release.key_prefix))
    if foreign:
        shown = ", ".join(foreign[:8]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 8 else "")
        raise WeightsMismatchError(f"{what} does not fit {type(net).__name__}: unexpected keys: {shown}")
    state = {k[len(release.key_prefix) :]: v for k, v in state.items()}
    return load_into(net, fill_shared(net, state, what), what=what)


def shared_names(net: nn.Module) -> list[list[str]]:
    """State-dict names that denote one tensor (a module registered under several names)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in net.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def fill_shared(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``state`` with every name of a shared tensor present, taken from the names the file has;
    ``WeightsMismatchError`` when the file holds different values under names of one tensor."""
    out = dict(state)
    for names in shared_names(net):
        present = [n for n in names if n in state]
        if not present:
            continue  # load_into reports them missing
        first = state[present[0]]
        for other in present[1:]:
            if state[other].shape != first.shape or not torch.equal(state[other], first):
                raise WeightsMismatchError(
                    f"{what}: {present[0]} and {other} name one shared tensor of "
                    f"{type(net).__name__} but hold different values"
                )
        out.update({n: first for n in names})
    return out


def random_state(net: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic values for every tensor of ``net`` (which may live on the meta device), in
    state-dict order, one draw per shared tensor, from ``numpy.random.default_rng(seed).random``
    (uniform doubles, a stream stable across numpy versions): 2-D ``*weight`` tensors
    U(-a, a) with ``a = sqrt(3 / fan_in)``, ``*bias`` U(-0.05, 0.05), other 1-D tensors (norm
    scales) 1 + U(-0.3, 0.3), anything else (latents, embedding tables) U(-1, 1)."""
    rng = np.random.default_rng(seed)
    drawn: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in net.state_dict(keep_vars=True).items():
        if id(tensor) not in drawn:
            u = rng.random(tuple(tensor.shape)) * 2 - 1
            if name.endswith("bias"):
                value = u * 0.05
            elif tensor.ndim == 1:
                value = 1 + u * 0.3
            elif tensor.ndim == 2 and name.endswith("weight"):
                value = u * np.sqrt(3.0 / tensor.shape[1])
            else:
                value = u
            drawn[id(tensor)] = torch.from_numpy(value.astype(np.float32))
        state[name] = drawn[id(tensor)]
    return state


def random_net(make_net: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make_net()`` built on the meta device and given :func:`random_state` ``(seed)``, in eval mode."""
    with torch.device("meta"):
        net = make_net()
    return load_into(net, random_state(net, seed), what=f"random weights (seed {seed})").eval()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` of names, shapes and float32 little-endian bytes in key order: the identity
    of a set of weights whatever file format holds it."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
        h.update(tensor.detach().float().contiguous().numpy().astype("<f4").tobytes())
    return "sha256:" + h.hexdigest()


def unique_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s state dict with each shared tensor under its first name only, contiguous (how
    safetensors stores a model whose modules are shared)."""
    drop = {name for names in shared_names(net) for name in names[1:]}
    return {k: v.detach().contiguous() for k, v in net.state_dict().items() if k not in drop}


class TileSetEncoder:
    """One slide's tile embeddings -> its slide embedding, with a net loaded from a release."""

    def __init__(
        self, net: nn.Module, device: str, release: Release, source: str, fingerprint: str, facts: dict[str, Any]
    ):
        self.net = net.to(device).eval()
        self.device = device
        self.release = release
        self.source = source
        self.fingerprint = fingerprint
        self.facts = facts

    @classmethod
    def load(
        cls,
        make_net: Callable[[], nn.Module],
        release: Release,
        resolved: tuple[str, str, str],
        device: str,
        facts: dict[str, Any],
    ) -> TileSetEncoder:
        """Build ``make_net()`` and load the weights :func:`resolve_weights` found into it strictly."""
        path, label, fingerprint = resolved
        with torch.device("meta"):
            net = make_net()
        return cls(load_release(net, release, path), device, release, label, fingerprint, facts)

    def __call__(
        self,
        tile_embeddings: np.ndarray,
        x_level0: np.ndarray | None = None,
        y_level0: np.ndarray | None = None,
        slide_mpp: float | None = None,
    ) -> np.ndarray:
        """``(N >= 1, in_dim)`` tile embeddings (any float dtype) -> ``(out_dim,)`` float32. The
        coordinates and µm/px are accepted for the aggregator interface and not used."""
        tiles = np.asarray(tile_embeddings)
        if tiles.ndim != 2 or tiles.shape[1] != self.net.in_dim or tiles.shape[0] == 0:
            raise ValueError(f"tile_embeddings must be (N >= 1, {self.net.in_dim}), got {tiles.shape}")
        with torch.inference_mode():
            out = self.net(torch.from_numpy(tiles.astype(np.float32, copy=False)).to(self.device))
        return out.float().cpu().numpy()

    def provenance(self) -> dict[str, Any]:
        """What defines this encoder's outputs (written next to slide embeddings)."""
        return {
            "architecture": self.release.architecture,
            **self.facts,
            "weights": self.source,
            "weights_fingerprint": self.fingerprint,
        }
