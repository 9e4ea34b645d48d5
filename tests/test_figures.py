"""The conventions every `affectprep explain` figure shares (models/figures.py): PNG + JSON pairs named
<sample>-<what>, the prediction title, frames shown as they were before normalisation."""
from __future__ import annotations

import json

import numpy as np
import torch

from affectprep.models.figures import displayable, new_figure, prediction_title, write_explanation


def test_an_explanation_is_a_png_and_the_json_of_its_numbers_named_by_sample(tmp_path):
    figure = new_figure(2, 2)
    figure.add_subplot().imshow(np.eye(3))
    png, record = write_explanation(figure, {"mass": [1.0, 2.0]}, tmp_path / "out", "transport", "subject/clip 1")
    assert (png.name, record.name) == ("subject_clip 1-transport.png", "subject_clip 1-transport.json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(record.read_text()) == {"sample_id": "subject/clip 1", "mass": [1.0, 2.0]}
    png, record = write_explanation(new_figure(1, 1), {"tau": 0.01}, tmp_path, "dpm-maps")
    assert png.name == "dpm-maps.png" and json.loads(record.read_text()) == {"tau": 0.01}


def test_the_title_names_the_prediction_its_probability_and_the_truth_when_known():
    probabilities = torch.tensor([0.1, 0.7, 0.2])
    names = ["happy", "sad", "angry"]
    assert prediction_title("c1", probabilities, names, 2) == "c1: predicted sad (0.70), true angry"
    assert prediction_title("c1", probabilities, names, -1, note="x") == "c1: predicted sad (0.70; x)"


def test_frames_are_drawn_as_they_were_before_normalisation():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    image = torch.rand(2, 3, 4, 5)
    normalised = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    shown = displayable(normalised, mean, std)
    assert shown.shape == (2, 4, 5, 3)
    np.testing.assert_allclose(shown, image.permute(0, 2, 3, 1).numpy(), atol=1e-6)
