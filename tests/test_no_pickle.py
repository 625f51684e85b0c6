"""No path that reads bytes from the broker or from disk may unpickle or evaluate them."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
SOURCES = [p for d in ("shared", "coordinator", "worker", "benchmarks") for p in (ROOT / d).rglob("*.py")]
FORBIDDEN = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|marshal|shelve)\b", re.M), "pickle-family import"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"torch\.load\((?![^)]*weights_only=True)"), "torch.load without weights_only=True"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle"),
]


def test_sources_exist():
    assert len(SOURCES) >= 10


def test_no_unpickling_or_eval_anywhere():
    found = [
        f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}: {what}"
        for path in SOURCES
        for text in [path.read_text()]
        for pattern, what in FORBIDDEN
        for m in pattern.finditer(text)
    ]
    assert found == []
