"""Dataset adapters: each reads one dataset's official layout into index rows (schema.INDEX).

Importing this package registers every adapter in ADAPTERS under its kind.
"""
from __future__ import annotations

from . import (affectnet, bp4d, dfew, disfa, ferplus, ferv39k, generic_csv, iemocap, mafw,  # noqa: F401 (registration)
               nvie, oulu, rafdb)
from .base import (ADAPTERS, DatasetAdapter, DatasetError, build_index, index_table, make_adapter,
                   options_for, register_adapter)

__all__ = ["ADAPTERS", "DatasetAdapter", "DatasetError", "build_index", "index_table", "make_adapter", "options_for",
           "register_adapter"]
