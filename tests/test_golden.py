"""Behaviour pinned byte for byte: a tiny-model sweep covering every unit kind, against tests/golden/.

The golden copy was written by the code before the layered restructuring (issue 12); a change that
alters any unit's result.json (timings live in timing.json and are not compared) fails here. To
accept a deliberate change of results, regenerate with ``ICLGD_REGEN_GOLDEN=1 pytest tests/test_golden.py``
and say why in the commit.
"""

import os
from pathlib import Path

import pytest

from iclgd.experiments.sweep import SweepConfig, reproduce

GOLDEN = Path(__file__).parent / "golden"

# every unit kind on the rotary/grouped-KV llama; compare and dual also on the two fused-projection layouts
SWEEPS = {
    "tiny-random-llama": dict(tasks=["sst2"], untrained=True, dual=True, synthetic=True, synthetic_steps=20,
                              momentum=True, momentum_steps=2),
    "tiny-random-gpt2": dict(tasks=["cb"], untrained=True, dual=True, synthetic=False, momentum=False),
    "tiny-random-gpt-neox": dict(tasks=["cb"], untrained=False, dual=True, synthetic=False, momentum=False),
}


def _unit_results(d: Path, data_dir: Path) -> dict[str, bytes]:
    """Each unit's result.json, with the data directory (recorded in data_sha256) as a placeholder."""
    where = str(data_dir).encode()
    return {p.parent.name: p.read_bytes().replace(where, b"<DATA_DIR>")
            for p in sorted((d / "units").glob("*/result.json"))}


@pytest.mark.parametrize("model", list(SWEEPS))
def test_unit_results_equal_the_golden_copy_byte_for_byte(model, tmp_path, data_dir):
    cfg = SweepConfig(model=model, seeds=[1], n_test=4, k=2, **SWEEPS[model])
    reproduce(cfg, tmp_path, data_dir, progress=False)
    got = _unit_results(tmp_path, data_dir)
    gold = GOLDEN / model
    if os.environ.get("ICLGD_REGEN_GOLDEN") == "1":
        for uid, data in got.items():
            (gold / "units" / uid).mkdir(parents=True, exist_ok=True)
            (gold / "units" / uid / "result.json").write_bytes(data)
    want = _unit_results(gold, data_dir)
    assert sorted(got) == sorted(want)
    for uid in want:
        assert got[uid] == want[uid], f"{model} unit {uid}: result.json differs from tests/golden/{model}/units/{uid}"
