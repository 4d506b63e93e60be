"""Shared by the exercise tests: assert that a check rejects a wrong solution in the right words."""

from __future__ import annotations

import pytest

from minidit.exercises import ExerciseError


def fails(check, fn, *words: str) -> str:
    """Run `check(fn)`, expect an ExerciseError whose message holds every one of `words`; return it."""
    with pytest.raises(ExerciseError) as info:
        check(fn)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    return str(info.value)
