"""Reusable building blocks for the models."""
from .sinkhorn import cosine_cost, sinkhorn

__all__ = ["cosine_cost", "sinkhorn"]
