"""README.md walked top to bottom as a new user would: every command it shows (its bash blocks, and the complete
commands quoted in its prose), in order, each must end with exit 0 and print no traceback.

The demo part runs as written, from a folder standing in for the repository (its `.venv` is this environment).
The "real dataset" part runs on real data made here: the demo's DFEW tree for `/data/DFEW`, a MAFW tree of real
face clips for `/data/MAFW`, a real OpenAI-compatible server on 127.0.0.1 for `http://gpu:8000/v1` and for OpenAI
itself (`$OPENAI_BASE_URL`), and tiny encoders saved here for the checkpoints the README names. Training commands
get `--tiny` and one epoch. What cannot run here is listed in NOT_RUN with the reason; a README command that is
neither run nor listed fails the test, so a new command is walked from the day it is documented.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


from affectprep.pipeline.demo import render_clip
from dataset_fixtures import make_mafw
from tiny_models import save_t5_that_writes

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV = Path(sys.executable).parent.parent

# How a command starts -> why it is not run here.
NOT_RUN = {
    "make test": "it runs this suite",
    "pip install": "installation: the suite runs in the installed environment",
    "affectprep train grace --dataset dfew --fold 1 --set model.video_encoder=/ckpt/mae-dfer":
        "the released MAE-DFER / VideoCLIP checkpoints cannot be downloaded here; tests/test_grace.py loads state "
        "dicts with their parameter names through the same path",
    **{start: "needs an AU dataset (BP4D) or FERV39k; tests/test_train_ssm_mgcma.py trains SSM on their layouts"
       for start in ("affectprep train ssm --dataset dfew --au-dataset", "affectprep train ssm --dataset dfew --fold 5",
                     "affectprep train ssm --dataset ferv39k", "affectprep train ssm --dataset dfew --fold 1 --au",
                     "affectprep train ssm --dataset bp4d")},
    "affectprep eval runs/ssm-": "needs FERV39k and DISFA; tests/test_train_ssm_mgcma.py scores BP4D + DFEW runs "
                                "on both",
    "affectprep train pca": "needs Oulu-CASIA VIS + NIR; tests/test_train_images.py trains PCA on both domains",
    "affectprep run --stage audio_features": "needs IEMOCAP and pretrained speech/text encoders; "
                                             "tests/test_train_ssm_mgcma.py trains MGCMA from cached features",
    "accelerate launch --multi_gpu": "needs GPUs; tests/test_train.py runs two processes under accelerate launch",
}
TRAIN_TINY = " --tiny --set epochs=1 --set batch_size=8 --set num_workers=0"


@dataclass
class Command:
    line: int
    text: str
    part: str        # "demo" (before "## Using it on a real dataset") or "project"


def readme_commands(readme: str) -> list[Command]:
    """The bash blocks' commands (continuations joined, comments dropped) and the prose's complete commands."""
    commands, part, block = [], "demo", None
    placeholder = re.compile(r"\[|\.\.\.|\b[A-Z]{2,}\b|\bK\b|\bN\b")
    for number, line in enumerate(readme.splitlines(), start=1):
        if line.startswith("## Using it on a real dataset"):
            part = "project"
        if line.startswith("```"):
            block = [] if line.startswith("```bash") else None
            continue
        if block is not None:
            text = re.sub(r"\s+#.*$", "", line).strip() if not line.lstrip().startswith("#") else ""
            if not text:
                continue
            if block and block[-1].endswith("\\"):
                commands[-1].text = commands[-1].text[:-1].rstrip() + " " + text
            else:
                commands.append(Command(number, text, part))
            block.append(text)
            continue
        if line.startswith("|"):
            continue          # the command table: synopses with placeholders
        for quoted in re.findall(r"`((?:\.\./|\.)?(?:\.venv/bin/)?affectprep [^`]+)`", line):
            if not placeholder.search(quoted):
                commands.append(Command(number, quoted, part))
    return commands


def _not_run(text: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if text.startswith(start)), None)


def test_every_readme_command_is_walked_or_says_why_not():
    commands = readme_commands(README.read_text())
    assert any(c.text.startswith("make demo") for c in commands)
    assert sum(c.part == "project" for c in commands) >= 15
    used = {start for start in NOT_RUN if any(c.text.startswith(start) for c in commands)}
    assert used == set(NOT_RUN), f"NOT_RUN lists commands the README no longer shows: {set(NOT_RUN) - used}"


def _substitute(command: Command, here: dict[str, str]) -> str:
    text = command.text
    for old, new in here.items():
        text = text.replace(old, new)
    if command.part == "project" and re.match(r"(.*&& )?affectprep train ", text.split(" && ")[-1]):
        text += TRAIN_TINY
    return text


def test_the_readme_walks_top_to_bottom_without_a_traceback(tmp_path, server):
    commands = readme_commands(README.read_text())
    repo = tmp_path / "repo"                      # stands in for the checkout: its .venv is this environment
    repo.mkdir()
    (repo / ".venv").symlink_to(VENV)
    project = tmp_path / "project"
    project.mkdir()
    data = tmp_path / "data"
    mafw = make_mafw(data / "MAFW", ("anger", "happiness", "neutral", "sadness", "surprise") * 2)
    for i, clip in enumerate(sorted((mafw / "data" / "clips").glob("*.mp4"))):   # real faces, not placeholders
        render_clip(("angry", "happy", "neutral", "sad", "surprise")[i % 5], clip, seed=i, num_frames=20,
                    size=(160, 120))
    encoders = tmp_path / "encoders"
    _save_tiny_videomae(encoders / "videomae-base")
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-readme-walk", "HF_HUB_OFFLINE": "1"}
    here = {"/data/DFEW": str(repo / "demo" / "DFEW"), "/data/MAFW": str(mafw),
            "http://gpu:8000/v1": server.base_url, "/ckpt/videomae-base": str(encoders / "videomae-base"),
            # a tiny T5 that always writes, and writes little: the README's large one cannot be downloaded here
            "t5:google/flan-t5-large": f"t5:{save_t5_that_writes(encoders / 't5')} --set cate.max_tokens=8"}
    cwd = {"demo": repo, "project": project}
    walked, skipped = [], []
    for command in commands:
        if (why := _not_run(command.text)) is not None:
            skipped.append((command.text, why))
            continue
        text = _substitute(command, here)
        if text.startswith("make demo"):
            # What `make demo` runs once the venv is installed (the Makefile's own recipe, its install step done).
            text = f"make -f {REPO / 'Makefile'} -o .venv/.installed demo"
        if "3f1c..." in text:     # a version id from `text list`, shortened as the README shows it
            listed = _run("affectprep text list --json", cwd["project"], env)
            fold_1 = [v for v in json.loads(listed.stdout)
                      if (v["dataset"], v["stage"], v["test_fold"]) == ("dfew", "cate", 1)]
            version = min(fold_1, key=lambda v: v["current"])["version"]          # another one, where there is
            text = text.replace("3f1c...", version[:8])
        if text.startswith("cd ") and " && " in text:   # a terminal's cd stays for the commands after it
            folder, text = text[3:].split(" && ", 1)
            cwd[command.part] = cwd[command.part] / folder
        done = _run(text, cwd[command.part], env)
        output = done.stdout + done.stderr
        assert "Traceback" not in output, f"README line {command.line}: {text}\n{output[-3000:]}"
        assert done.returncode == 0, f"README line {command.line}: {text} -> exit {done.returncode}\n{output[-3000:]}"
        walked.append(text)
    assert len(walked) >= 20 and len(skipped) == len(commands) - len(walked)
    assert (repo / "demo" / "report" / "index.html").exists() and (project / "report" / "index.html").exists()


def _run(text: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


def _save_tiny_videomae(folder: Path) -> None:
    import torch
    from transformers import VideoMAEConfig, VideoMAEModel

    from affectprep.models.grace import TINY_VIDEO

    torch.manual_seed(0)
    VideoMAEModel(VideoMAEConfig(**{**TINY_VIDEO, "num_frames": 16})).save_pretrained(folder)
