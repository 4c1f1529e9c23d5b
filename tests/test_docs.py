"""The README stays a page a newcomer reads in minutes, and no link in it or in docs/ points nowhere."""

import re
from pathlib import Path

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
