"""`facs`: the FACS asset the trainer reads: AU descriptions and expression compositions per label set (SSM
Table S4), the expression x AU prior matrix of every pairing, and the texts for CoOp-style prompting. Its only
inputs are the tables in prompts/facs/, whose contents are in the cache key."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from affectprep import labels

from .. import facs
from ..stage import Stage, file_digest


@dataclass(frozen=True)
class FacsConfig:
    pass


class FacsStage(Stage):
    name = "facs"
    version = 1
    Config = FacsConfig
    reads: dict[str, tuple[str, ...]] = {}
    scope = "dataset"

    def identity(self) -> dict[str, Any]:
        # The dataset's own label set (a CSV dataset's classes) gets its rows too, so it is part of the key.
        return {"dataset_labels": self.context.get("label_names"),
                **{path.name: file_digest(path) for path in facs.source_files()}}

    def process_dataset(self, rows) -> list[dict[str, Any]]:
        own = labels.LabelSet(self.context["label_set"], tuple(self.context["label_names"])) \
            if self.context.get("label_set") else None
        return [{**{k: v for k, v in row.items() if k != "asset_id"}, "sample_id": row["asset_id"], "status": "ok",
                 "error": None} for row in facs.asset_rows(dataset_set=own)]
