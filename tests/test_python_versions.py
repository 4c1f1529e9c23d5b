"""requires-python says 3.10-3.13: every source file parses as Python 3.10 and uses no standard-library name
added after it (this machine has 3.11 only, so this is what can be checked here)."""

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# names added to the standard library in 3.11-3.13 that a 3.10 interpreter lacks
NEWER = re.compile(r"\b(tomllib|StrEnum|ExceptionGroup|TaskGroup|LiteralString|assert_never|reveal_type|"
                   r"itertools\.batched|from itertools import [^\n]*\bbatched\b|batched\(|datetime\.UTC|typing\.Self|from typing import [^\n]*\bSelf\b|typing\.Never)\b")


def test_requires_python_admits_3_10_to_3_13():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert spec == ">=3.10,<3.14"


def test_sources_parse_as_python_3_10_and_use_no_newer_stdlib_names():
    files = sorted((ROOT / "src").rglob("*.py"))
    assert len(files) > 30
    for f in files:
        text = f.read_text(encoding="utf-8")
        ast.parse(text, filename=str(f), feature_version=(3, 10))  # SyntaxError on 3.11+ syntax (except*, ...)
        hit = NEWER.search(text)
        assert hit is None, f"{f.relative_to(ROOT)}: {hit.group(0)} is not in Python 3.10"
