import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

from iclgd.core.tasks import default_data_dir  # noqa: E402

DATA = default_data_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if DATA is None or not DATA.is_dir():
        pytest.fail("../shared/data (or $ICLGD_DATA_DIR) is required by the test suite")
    return DATA


_MODELS = {}


@pytest.fixture
def tiny():
    """Cached tiny random models by name (built in code, no download)."""
    from iclgd.core.models import load_model

    def get(name):
        if name not in _MODELS:
            _MODELS[name] = load_model(name)
        return _MODELS[name]

    return get
