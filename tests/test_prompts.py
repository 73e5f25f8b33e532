"""The self-distillation prompt set: well-formed, broad, duplicate-free, train/held-out disjoint, reproducible."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "medusa_gguf" / "prompts"
BUILDER = PROMPTS_DIR / "build_prompts.py"
FILES = ("train.jsonl", "heldout.jsonl")

REQUIRED = {"writing", "reasoning", "math", "code", "extraction", "stem", "humanities", "summarization", "rewriting"}
KNOWN = REQUIRED | {"roleplay", "advice"}


def load(name: str) -> list[dict]:
    rows = []
    with open(PROMPTS_DIR / name, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            assert line.endswith("\n") and line.strip(), f"{name}:{i} is blank or unterminated"
            rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def sets() -> dict[str, list[dict]]:
    return {name: load(name) for name in FILES}


@pytest.mark.parametrize("name", FILES)
def test_rows_are_well_formed(sets, name):
    for row in sets[name]:
        assert set(row) == {"prompt", "category"}
        assert isinstance(row["prompt"], str) and row["prompt"].strip() == row["prompt"] and row["prompt"]
        assert row["category"] in KNOWN


def test_sizes_and_categories(sets):
    train, held = (Counter(row["category"] for row in sets[name]) for name in FILES)
    assert 2800 <= sum(train.values()) <= 3200
    assert 220 <= sum(held.values()) <= 260
    assert REQUIRED <= set(train) and REQUIRED <= set(held)
    for category in REQUIRED:
        assert held[category] >= 20, category
        assert train[category] >= 100, category


def test_no_duplicates_and_no_overlap(sets):
    train = [row["prompt"] for row in sets["train.jsonl"]]
    held = [row["prompt"] for row in sets["heldout.jsonl"]]
    assert len(set(train)) == len(train)
    assert len(set(held)) == len(held)
    assert not set(train) & set(held)


def test_builder_reproduces_committed_files(tmp_path):
    subprocess.run([sys.executable, str(BUILDER), str(tmp_path)], check=True, capture_output=True, timeout=120)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (PROMPTS_DIR / name).read_bytes(), f"{name} differs; rebuild it"


def test_reserved_names_and_places_stay_out_of_train(sets):
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("build_prompts", BUILDER)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    train_text = "\n".join(row["prompt"] for row in sets["train.jsonl"])
    held_text = "\n".join(row["prompt"] for row in sets["heldout.jsonl"])
    for reserved in (builder.NAME_SPLIT, builder.TOWN_SPLIT, builder.CITY_SPLIT):
        assert reserved["heldout"] and not set(reserved["heldout"]) & set(reserved["train"])
        for word in reserved["heldout"]:
            pattern = r"\b" + re.escape(word) + r"\b"
            assert not re.search(pattern, train_text), f"held-out-only {word!r} appears in train.jsonl"
    assert any(re.search(r"\b" + re.escape(w) + r"\b", held_text) for w in builder.NAME_SPLIT["heldout"])
