"""Issue 17: placement under several processes, provenance of the hardware, batched captures."""

import json

from iclgd.core.io import hardware, library_versions
from iclgd.core.models import placement


def test_each_launched_process_takes_its_own_gpu(monkeypatch):
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert placement("cuda", None) == ("cuda", None)  # one process: as given
    assert placement("cuda", "auto") == ("cuda", "auto")  # one process may spread a large model over every GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert placement("cuda", None) == ("cuda:1", None)
    assert placement("cuda", "auto") == ("cuda:1", {"": "cuda:1"})  # not every rank on GPU 0
    assert placement("cpu", None) == ("cpu", None)
    assert placement("cuda:0", None) == ("cuda:0", None)  # an explicit device wins


def test_results_record_the_hardware_and_determinism_flags():
    import torch

    hw = hardware()
    assert hw["cpu_threads"] == torch.get_num_threads() and hw["cuda_available"] == torch.cuda.is_available()
    assert hw["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert library_versions()["hardware"] == json.loads(json.dumps(hw))
