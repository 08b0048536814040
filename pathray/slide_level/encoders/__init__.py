"""Slide encoders: tile embeddings + coordinates of one slide -> one slide embedding.

Public API::

    GigaPathSlideEncoder.from_weights(source=None, device="cpu") -> encoder
    encoder(tile_embeddings (N, 1536), x_level0, y_level0, slide_mpp) -> (768,) float32
    encoder.all_layers(...) -> (13, 768)        encoder.embed(...) -> both, one pass
    encoder.provenance() -> dict
    gigapath_coords(x_level0, y_level0, slide_mpp) -> (N, 2) official coordinates
"""

from .gigapath import GigaPathSlideEncoder, gigapath_coords

__all__ = ["GigaPathSlideEncoder", "gigapath_coords"]
