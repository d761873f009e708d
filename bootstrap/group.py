"""A service group's file: one endpoint over member services, split by weight, mirror and header.

    {"name": "qwen-chat", "token": "...",
     "routes": [{"service": "qwen-v23", "weight": 90},
                {"service": "qwen-v24", "weight": 10, "mirror_weight": 5},
                {"service": "qwen-v24", "match": {"headers": {"User-Agent": "~^CherryStudio"}}}]}

Read with the spec's own machinery (errors by JSON path, unknown fields with the valid names),
so `berth group apply`, the agent's API and `berth render k8s` all read it one way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from bootstrap.spec import Secret, SpecIssue, SpecModel, check_name, parse_document, read_document

DEFAULT_WEIGHT = 100  # a member named only by its service's metadata.group


class HeaderMatch(SpecModel):
    headers: dict[str, str] = Field(min_length=1, description="exact value, or a regular expression after '~'")

    @field_validator("headers")
    @classmethod
    def _patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for name, wanted in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if wanted.startswith("~"):
                try:
                    re.compile(wanted[1:])
                except re.error as exc:
                    raise ValueError(f"{name}: {wanted[1:]!r} is not a valid regular expression ({exc})") from None
        return value

    def matches(self, headers: Any) -> bool:
        """True when every listed header matches (`headers`: a case-insensitive mapping)."""
        for name, wanted in self.headers.items():
            value = headers.get(name)
            if value is None:
                return False
            if wanted.startswith("~"):
                if not re.search(wanted[1:], value):
                    return False
            elif value != wanted:
                return False
        return True


class GroupRoute(SpecModel):
    service: str
    weight: int | None = Field(None, ge=0, le=1000, description=f"relative share of the group's requests (default {DEFAULT_WEIGHT})")
    mirror_weight: int = Field(0, ge=0, le=100, description="percent of the group's requests also copied here")
    match: HeaderMatch | None = None

    @field_validator("service")
    @classmethod
    def _service(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _weight_or_match(self) -> "GroupRoute":
        if self.match is not None and self.weight is not None:
            raise ValueError("a route with match takes every request it matches; give it no weight")
        return self

    @property
    def share(self) -> int:
        """This route's weight in the split (routes with match take no part in it)."""
        if self.match is not None:
            return 0
        return DEFAULT_WEIGHT if self.weight is None else self.weight


class GroupSpec(SpecModel):
    name: str
    token: Secret | None = None
    routes: list[GroupRoute] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "group")

    @model_validator(mode="after")
    def _someone_answers(self) -> "GroupSpec":
        if not any(route.share > 0 for route in self.routes) and all(route.match is None for route in self.routes):
            raise ValueError("every route has weight 0: give one route a weight above 0")
        return self

    def to_json_dict(self, *, reveal_secrets: bool = False) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, context={"reveal_secrets": reveal_secrets})


def parse_group(raw: Any, *, source: str | None = None) -> tuple[GroupSpec, list[SpecIssue]]:
    """Validate a group file (a dict or JSON text); SpecError names each problem by JSON path."""
    return parse_document(GroupSpec, raw, source=source, what="group file")


def load_group_file(path: str | Path) -> tuple[GroupSpec, list[SpecIssue]]:
    return parse_group(read_document(path), source=str(path))
