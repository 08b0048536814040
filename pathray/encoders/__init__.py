"""Encoder zoo: registry of pathology foundation models, weight loading, batched inference.

Public API (see docs/architecture.md and docs/models.md)::

    get_spec(name) -> EncoderSpec          list_models() -> list[str]
    EncoderConfig(model, weights=None, device="auto", dtype="fp32", compile=False,
                  output_dtype="float32", batch_size=64)
    load_encoder(config) -> Encoder        encoder(tiles_uint8_NHW3) -> (N, D) numpy
    write_random_weights(model, out_dir, *, seed=0, **arch_overrides) -> Path
"""

from .checkpoint import file_sha256, read_state_dict
from .encoder import Encoder, EncoderConfig, load_encoder
from .preprocess import preprocess_batch
from .random_weights import write_random_weights
from .registry import REGISTRY, EncoderSpec, Preprocess, get_spec, list_models

__all__ = [
    "Encoder",
    "EncoderConfig",
    "EncoderSpec",
    "Preprocess",
    "REGISTRY",
    "file_sha256",
    "get_spec",
    "list_models",
    "load_encoder",
    "preprocess_batch",
    "read_state_dict",
    "write_random_weights",
]
