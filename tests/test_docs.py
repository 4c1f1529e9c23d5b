"""The README stays a page a newcomer reads in minutes, and no link in it or in docs/ points nowhere."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_at_most_2000_words():
    words = len((ROOT / "README.md").read_text().split())
    print(f"README.md: {words} words")
    assert words <= 2000


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for m in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", f.read_text()):
            target = m.group(1)
            if not target.startswith(("http://", "https://", "mailto:")) and not (f.parent / target).exists():
                broken.append(f"{f.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def runnable_blocks() -> list[tuple[str, str, str]]:
    """(where, language, code) of every fenced block whose info string is ``bash runnable`` or ``python runnable``
    in the README and docs/."""
    out = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = f.read_text()
        for m in re.finditer(r"^```(bash|python) runnable\n(.*?)^```", text, flags=re.S | re.M):
            line = text[: m.start()].count("\n") + 1
            out.append((f"{f.relative_to(ROOT)}:{line}", m.group(1), m.group(2)))
    return out


def test_there_are_runnable_blocks():
    blocks = runnable_blocks()
    print(f"{len(blocks)} runnable blocks: {', '.join(w for w, _, _ in blocks)}")
    assert len(blocks) >= 3


@pytest.mark.parametrize("where,lang,code", runnable_blocks(), ids=[w for w, _, _ in runnable_blocks()])
def test_runnable_doc_block(where, lang, code, tmp_path, data_dir):
    """Each block as a reader would paste it, in a fresh folder, with this environment's `iclgd` on PATH and a
    time budget of 5 minutes (they run on tiny models in seconds)."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "ICLGD_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    print(f"{where}: {time.perf_counter() - t:.1f} s")
    assert res.returncode == 0, f"{where} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
