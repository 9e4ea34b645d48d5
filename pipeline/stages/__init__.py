"""Every stage, in DAG order. A stage's upstream stores are the keys of its `reads` (plus the dataset index)."""
from __future__ import annotations

from ..stage import Stage
from .audio import AudioStage
from .captions import CaptionsStage
from .cate import CateStage
from .emotions import EmotionsStage
from .faces import FacesStage
from .facs import FacsStage
from .features import AudioFeaturesStage, FeaturesStage, TextFeaturesStage
from .frames import FramesStage

STAGES: dict[str, type[Stage]] = {s.name: s for s in (AudioStage, FramesStage, FacesStage, CaptionsStage,
                                                      EmotionsStage, CateStage, FacsStage, FeaturesStage,
                                                      TextFeaturesStage, AudioFeaturesStage)}
# Stages that only write text: switching the LLM or captioner reruns these and nothing else.
TEXT_STAGES = ("captions", "cate")


def stages_up_to(target: str | None) -> list[type[Stage]]:
    """The stages a run must execute to produce `target` (all stages when None), upstream first."""
    if target is None:
        return list(STAGES.values())
    if target not in STAGES:
        raise KeyError(target)
    needed: set[str] = set()

    def visit(name: str) -> None:
        if name in STAGES and name not in needed:
            needed.add(name)
            for upstream in STAGES[name].reads:
                visit(upstream)

    visit(target)
    return [s for s in STAGES.values() if s.name in needed]
