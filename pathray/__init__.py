"""pathray: whole-slide images to foundation-model tile embeddings, at cluster scale."""

__version__ = "0.1.0"
