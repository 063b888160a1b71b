"""The one error type for bad settings, so every front end can name the field the user actually typed."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


class SettingError(ValueError):
    """A setting is outside its valid range.

    ``field`` is the Python keyword the value arrived as; front ends that spell it differently (the CLI's
    ``--base-batch``, Trainer's ``--legw_base_batch_size``) re-raise with :meth:`renamed`.
    """

    def __init__(
        self, field: str, requirement: str, value: Any = None, *, detail: str = "", also: tuple[str, ...] = ()
    ) -> None:
        self.field = field
        self.requirement = requirement
        self.value = value
        self.detail = detail
        self.also = also  # other fields the requirement names, at its {0}, {1}...: renamed with the field
        super().__init__(self._render(field))

    def __reduce__(self) -> tuple[Any, ...]:
        # raised in a worker process (multiprocessing, DataLoader workers) it crosses back by pickle
        return _rebuild_setting_error, (self.field, self.requirement, self.value, self.detail, self.also)

    def _render(self, field: str) -> str:
        requirement = self.requirement.format(*self.also) if self.also else self.requirement
        message = f"{field} {requirement}, got {self.value!r}"
        return f"{message} ({self.detail})" if self.detail else message

    def renamed(self, field: str) -> SettingError:
        """The same error, naming the field as ``field``."""
        return SettingError(field, self.requirement, self.value, detail=self.detail, also=self.also)

    def renamed_by(self, name_of: Callable[[str], str]) -> SettingError:
        """The same error, naming the field and every other field it mentions as ``name_of`` spells them."""
        also = tuple(map(name_of, self.also))
        return SettingError(name_of(self.field), self.requirement, self.value, detail=self.detail, also=also)


def _rebuild_setting_error(
    field: str, requirement: str, value: Any, detail: str, also: tuple[str, ...]
) -> SettingError:
    return SettingError(field, requirement, value, detail=detail, also=also)


def positive(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SettingError(field, "must be a finite number > 0", value)
    return value


def positive_int(field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SettingError(field, "must be an integer >= 1", value)
    return value


def non_negative(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SettingError(field, "must be a finite number >= 0", value)
    return value


def one_of(field: str, value: str, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise SettingError(field, f"must be one of {', '.join(map(repr, choices))}", value)
    return value
