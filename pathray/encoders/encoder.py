"""The :class:`Encoder`: uint8 tile batches in, ``(N, D)`` embeddings out."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pathray.errors import EncoderError

from .build import count_params, create_model, resolve_architecture, spec_for_config
from .builders import from_release_layout, get_builder
from .checkpoint import LoadedWeights, card_adaptations, load_into
from .loading import load_weights
from .preprocess import preprocess_batch
from .registry import EncoderSpec, get_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class EncoderConfig:
    model: str  # registry name ("uni2-h") or "timm:<architecture>"
    weights: str | None = None  # None: the spec's HF hub repo; else a local hub-layout dir,
    # a .safetensors / .pth / .bin file, or "hf-hub:org/name"
    device: str = "auto"  # "auto" = cuda if available else cpu
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast on the device)
    compile: bool = False
    output_dtype: str = "float32"  # float32 | float16
    batch_size: int = 64  # micro-batch inside one call

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {sorted(OUTPUT_DTYPES)}, got {self.output_dtype!r}")
        if int(self.batch_size) < 1:
            raise ValueError("batch_size must be >= 1")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class BuiltModel:
    """A spec's network with its weights loaded strictly, and what provenance records of how."""

    model: torch.nn.Module
    architecture: str  # what was built (timm name or builder architecture)
    model_kwargs: dict[str, Any]  # the arguments it was built with
    weights_source: str  # where the weights came from (no credentials)
    weights_fingerprint: str  # "hf:org/name@sha" | "sha256:..."
    adaptations: tuple[str, ...] = ()  # card-prescribed changes made to the weights on load


class Encoder:
    """One model on one device. Call it with ``(N, H, W, 3)`` uint8 tiles (numpy, may be
    read-only; never written to) to get ``(N, embed_dim)`` embeddings as numpy."""

    def __init__(self, spec: EncoderSpec, built: BuiltModel, config: EncoderConfig):
        model = built.model
        self.spec = spec
        self.config = config
        self.device = resolve_device(config.device)
        self.weights_source = built.weights_source
        self.weights_fingerprint = built.weights_fingerprint
        self.architecture = built.architecture
        self.model_kwargs = built.model_kwargs
        self.adaptations = built.adaptations  # card-prescribed weight changes made on load (provenance)
        self.num_params = count_params(model)
        model = model.eval().requires_grad_(False).to(self.device)
        self._channels_last = self.device.type == "cuda"
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._autocast_dtype = DTYPES[config.dtype]
        self._forward = torch.compile(self._pool_forward, dynamic=False) if config.compile else self._pool_forward
        self.embed_dim = spec.embed_dim or self._probe_dim()
        if spec.embed_dim and self._probe_dim() != spec.embed_dim:
            raise EncoderError(f"{spec.name}: model gives {self._probe_dim()}-d embeddings, spec says {spec.embed_dim}")

    # -- forward -----------------------------------------------------------------------
    def _pool_forward(self, x: torch.Tensor) -> torch.Tensor:
        return get_builder(self.spec.builder).pool(self.model, x, self.spec.pooling)

    def _autocast(self):
        if self._autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def _probe_dim(self) -> int:
        if not hasattr(self, "_dim_cache"):
            n = self.spec.input_px
            with torch.inference_mode():
                x = torch.zeros(1, 3, n, n, device=self.device)
                self._dim_cache = int(self._pool_forward(x).shape[-1])
        return self._dim_cache

    def _to_device(self, tiles: np.ndarray) -> torch.Tensor:
        if self.device.type == "cuda":
            # one pinned staging buffer, reused: each chunk's result is copied back (a sync)
            # before the next chunk overwrites it
            n = int(np.prod(tiles.shape))
            if getattr(self, "_pinned", None) is None or self._pinned.numel() < n:
                self._pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            buf = self._pinned[:n].view(tiles.shape)
            buf.numpy()[...] = tiles
            return buf.to(self.device, non_blocking=True)
        with warnings.catch_warnings():  # read-only input: we never write into it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(tiles)

    def encode_tensor(self, tiles_u8: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, H, W, 3)`` tensor on the encoder's device -> float32 ``(N, D)`` tensor."""
        x = preprocess_batch(tiles_u8, self.spec.preprocess)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self._forward(x)
        return out.float()

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) tiles, got {tiles.shape} {tiles.dtype}")
        out_dtype = OUTPUT_DTYPES[self.config.output_dtype]
        n = tiles.shape[0]
        result = np.empty((n, self.embed_dim), dtype=out_dtype)
        bs = int(self.config.batch_size)
        with torch.inference_mode():
            for start in range(0, n, bs):
                chunk = tiles[start : start + bs]
                m = len(chunk)
                if self.config.compile and m < bs and n > bs:
                    # keep one static shape for the compiled graph: pad the last micro-batch
                    chunk = np.concatenate([chunk, np.zeros((bs - m, *chunk.shape[1:]), np.uint8)])
                if not chunk.flags.c_contiguous:
                    chunk = np.ascontiguousarray(chunk)
                emb = self.encode_tensor(self._to_device(chunk))[:m]
                result[start : start + m] = emb.cpu().numpy().astype(out_dtype, copy=False)
        return result

    # -- provenance ----------------------------------------------------------------------
    def provenance(self) -> dict[str, str]:
        import timm

        p = self.spec.preprocess
        return {
            "model": self.spec.name,
            "architecture": self.architecture,
            "builder": self.spec.builder,
            "family": self.spec.family,
            "embed_dim": str(self.embed_dim),
            "num_params": str(self.num_params),
            "pooling": self.spec.pooling,
            "preprocess": p.describe(),
            "input_px": str(self.spec.input_px),
            "native_mpp": str(self.spec.native_mpp),
            "weights_source": self.weights_source,
            "weights_fingerprint": self.weights_fingerprint,
            "weights_adaptations": "; ".join(self.adaptations) or "none",
            "dtype": self.config.dtype,
            "output_dtype": self.config.output_dtype,
            "device": str(self.device),
            "compile": str(bool(self.config.compile)),
            "torch": torch.__version__,
            "timm": timm.__version__,
        }

    def __repr__(self) -> str:
        return (
            f"Encoder({self.spec.name!r}, dim={self.embed_dim}, device={self.device}, dtype={self.config.dtype}, "
            f"weights={self.weights_fingerprint})"
        )


def load_encoder(config: EncoderConfig) -> Encoder:
    """Build the spec's architecture and load its weights (hub, local dir or file)."""
    spec = get_spec(config.model)
    loaded: LoadedWeights = load_weights(spec, config.weights)
    spec = spec_for_config(spec, loaded.config)
    built = build_model(spec, loaded)
    return Encoder(spec, dataclasses.replace(built, model=built.model.float()), config)


def build_model(spec: EncoderSpec, loaded: LoadedWeights) -> BuiltModel:
    """The spec's network with ``loaded``'s weights, strictly
    (:func:`~pathray.encoders.checkpoint.load_into`); its ``adaptations`` name the
    card-prescribed changes made to the weights on load (recorded in provenance)."""
    arch, kwargs = resolve_architecture(spec, loaded.config)
    try:
        model = create_model(arch, kwargs, meta=True, builder=spec.builder)
    except Exception as exc:  # noqa: BLE001 - bad architecture args in a config.json
        raise EncoderError(f"{spec.name}: cannot build {arch} with {sorted(kwargs)}: {exc}") from exc
    what = f"{spec.name} weights {loaded.source}"
    released = from_release_layout(loaded.state_dict, spec.checkpoint_prefix, spec.checkpoint_ignore)
    released = get_builder(spec.builder).from_release(model, released)
    state_dict, adaptations = card_adaptations(spec, model, released)
    model = load_into(model, state_dict, what=what)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # non-persistent buffers: rebuild on CPU and load normally
        model = load_into(create_model(arch, kwargs, builder=spec.builder), state_dict, what=what)
    return BuiltModel(model, arch, kwargs, loaded.source, loaded.fingerprint, tuple(adaptations))
