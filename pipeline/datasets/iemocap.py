"""IEMOCAP: speech + transcript, the 4-class protocol, leave-one-session-out folds.

Layout (IEMOCAP_full_release): `Session{1..5}/dialog/EmoEvaluation/<dialog>.txt`, one summary line per utterance,
`[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]` (the other lines are individual
annotators' votes); transcripts `dialog/transcriptions/<dialog>.txt` as
`Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.`; audio `sentences/wav/<dialog>/<utterance>.wav`.

Labels: iemocap4 (neutral, happy, angry, sad), excited merged into happy (option `merge_excited`). Utterances with a
label outside the protocol (fru, sur, fea, dis, oth, xxx; exc when not merged) are left out by the protocol, not bad
input: they get no row and are counted in `excluded`. fold = session 1..5; subject = the speaker (`Ses01F` = the
woman of session 1; the letter in the dialog name only says who wore the motion-capture markers).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affectprep.labels import IEMOCAP4, IEMOCAP_EXCLUDED, UnknownLabel, iemocap_index

from .base import BadSample, DatasetAdapter, DatasetError, register_adapter, text_lines

_SUMMARY = re.compile(r"\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\t(\S+)\t(\S+)\t\[.*\]\s*")
_UTTERANCE = re.compile(r"(Ses(\d\d)[FM]_.+)_([FM])\d+")
_TRANSCRIPT = re.compile(r"(\S+) \[[\d.]+-[\d.]+\]:\s?(.*)")


@register_adapter("iemocap")
class IEMOCAP(DatasetAdapter):
    label_set = "iemocap4"

    @dataclass(frozen=True)
    class Options:
        merge_excited: bool = True      # exc counts as happy (the usual 4-class protocol); False = exc is excluded

    def evaluations(self) -> list[Path]:
        files = sorted(p for p in self.root.glob("Session*/dialog/EmoEvaluation/*.txt") if not p.name.startswith("."))
        if not files:
            raise DatasetError(f"iemocap: no Session*/dialog/EmoEvaluation/*.txt under {self.root}")
        return files

    def annotation_files(self) -> list[Path]:
        transcripts = sorted(p for p in self.root.glob("Session*/dialog/transcriptions/*.txt")
                             if not p.name.startswith("."))
        return self.evaluations() + transcripts

    def rows(self) -> Iterator[dict[str, Any]]:
        for path in self.evaluations():
            session = path.parents[2]
            transcripts = self._transcripts(session / "dialog" / "transcriptions" / path.name)
            for line, text in text_lines(path):
                if not text.startswith("["):
                    continue
                match = _SUMMARY.fullmatch(text)
                code = match[2].lower() if match else None
                if code in IEMOCAP_EXCLUDED or (code == "exc" and not self.options.merge_excited):
                    self.excluded[code] += 1
                    continue
                yield self.attempt(path, line, lambda known: self._utterance(
                    match, session, transcripts, path, line, known))

    def _utterance(self, match: re.Match[str] | None, session: Path, transcripts: dict[str, str], path: Path,
                   line: int, known: dict[str, Any]) -> dict[str, Any]:
        if match is None:
            raise BadSample("expected '[start - end]<TAB>utterance<TAB>label<TAB>[V, A, D]'")
        utterance, code = match[1], match[2]
        parts = _UTTERANCE.fullmatch(utterance)
        if parts is None:
            raise BadSample(f"utterance id '{utterance}' is not of the form Ses01F_impro01_F000")
        dialog, number, speaker = parts[1], int(parts[2]), parts[3]
        known.update(fold=number, subject=f"Ses{number:02d}{speaker}")
        sample_id = self.claim(utterance, path, line, known)
        try:
            label = iemocap_index(code)
        except UnknownLabel as e:
            raise BadSample(str(e)) from None
        wav = self.media_file(self.inside(session, f"sentences/wav/{dialog}/{utterance}.wav"))
        return {"sample_id": sample_id, "media_path": str(wav), "media_kind": "audio", "label": label,
                "label_name": IEMOCAP4[label], "labels": [label], "fold": number, "subject": known["subject"],
                "transcript": transcripts.get(utterance)}

    @staticmethod
    def _transcripts(path: Path) -> dict[str, str]:
        """utterance id -> text. Lines of other forms (none in the release) are not utterances and are skipped."""
        if not path.is_file():
            return {}
        return {m[1]: m[2].strip() for _, text in text_lines(path) if (m := _TRANSCRIPT.fullmatch(text.strip()))}
