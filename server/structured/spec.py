"""What a request asks its output to match, in a form that is hashable (the compile cache's key)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

GrammarKind = Literal["json_schema", "regex", "choice", "grammar"]
ANY_JSON_OBJECT = json.dumps({"type": "object"})


@dataclass(frozen=True)
class GrammarSpec:
    """``kind`` and its source text: a JSON schema (as JSON), a regex, a JSON list of choices, or an
    EBNF grammar (xgrammar's / GBNF syntax, ``root`` rule first)."""

    kind: GrammarKind
    source: str

    @classmethod
    def json_schema(cls, schema: dict | str) -> GrammarSpec:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> GrammarSpec:
        """OpenAI's ``{"type": "json_object"}``: any JSON object."""
        return cls("json_schema", ANY_JSON_OBJECT)

    @classmethod
    def choice(cls, choices: list[str]) -> GrammarSpec:
        return cls("choice", json.dumps(choices, ensure_ascii=False))

    def ebnf_of_choice(self) -> str:
        """The grammar matching exactly one of the choices (JSON string escapes are EBNF's too)."""
        choices = json.loads(self.source)
        return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
