import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# No hub lookups (there is no network here; a lookup would retry for about a minute), and no face-alignment
# weights from the user's own torch hub cache leaking into tests that expect the offline default.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "TORCH_HOME" not in os.environ:
    os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="affectprep-torch-home-")
    atexit.register(shutil.rmtree, os.environ["TORCH_HOME"], True)

# The fixture builders (dataset_fixtures, media_fixtures, pipeline_fixtures) are plain modules beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

# Tests run tiny models: one thread each is fastest on a small CI machine, where more threads only fight the Dask
# and DataLoader worker processes for the same cores.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def server():
    """A real OpenAI-compatible server on 127.0.0.1 (tests/openai_server.py), one per test module."""
    from openai_server import OpenAITestServer

    with OpenAITestServer() as running:
        yield running
