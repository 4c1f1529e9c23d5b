import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ICLGD_PROGRESS", "tty")  # bars on a terminal only: CLI output stays the results (tests/test_progress.py)
warnings.filterwarnings("ignore")

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

from iclgd.core.tasks import default_data_dir  # noqa: E402

DATA = default_data_dir()
REAL_DATA = DATA is not None and DATA.is_dir()
WHERE = "../shared/data beside the project, or $ICLGD_DATA_DIR"
NO_DATA = f"needs the real task data, and there is no data directory ({WHERE})"
if not REAL_DATA:  # a clone on its own: every test that only needs *some* task data gets the stand-in
    import atexit
    import shutil
    import tempfile

    from fixture_data import write_fixture_data

    DATA = write_fixture_data(Path(tempfile.mkdtemp(prefix="iclgd-fixture-data-")))
    atexit.register(shutil.rmtree, DATA, ignore_errors=True)
    os.environ["ICLGD_DATA_DIR"] = str(DATA)


def pytest_configure(config):
    config.addinivalue_line("markers", "real_data: checks a property of the real tasks (skipped without them)")
    if not REAL_DATA and os.environ.get("ICLGD_REQUIRE_DATA") == "1":
        raise pytest.UsageError(f"ICLGD_REQUIRE_DATA=1 (as in .ci/run) but there is no data directory ({WHERE}): "
                                "the real-data tests would be skipped")


def pytest_collection_modifyitems(config, items):
    if REAL_DATA:
        return
    for item in items:
        if "real_data" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=NO_DATA))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory, or the stand-in (tests/fixture_data.py) on a clone without one."""
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
