"""Request bodies of the HTTP API (pydantic), in OpenAI's and vLLM's field names.

Every field we declare acts as OpenAI or vLLM documents it. Fields of theirs that we do not implement
are refused with a 400 naming them (``unsupported``) unless they carry their neutral value; other
unknown fields are ignored, as OpenAI clients send many optional ones that change nothing (metadata,
``store``...). Responses are plain dicts built by ``openai_format``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.structured.spec import GrammarSpec

MAX_CHOICES = 64  # n per request: bounds how many engine requests one HTTP request can queue
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's default cap
MAX_LOGIT_BIAS = 1024
MAX_GRAMMAR_CHARS = 32 * 1024  # a schema / regex / grammar: compile time grows with it

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
StopStr = Annotated[str, Field(max_length=256)]
GrammarText = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)]
Choice = Annotated[str, Field(min_length=1, max_length=1024)]


def refused(param: str, message: str) -> PydanticCustomError:
    """A validation error that names ``param`` (rendered as the OpenAI error's ``param``)."""
    return PydanticCustomError("refused", "{message}", {"message": message, "param": param})


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM: usage so far in every chunk.")


class JsonSchemaFormat(_Body):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(..., alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise refused("response_format.json_schema", "response_format json_schema needs json_schema")
        return self


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs`` (the newer name of its ``guided_*`` fields): exactly one of these."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    json_: dict[str, Any] | GrammarText | None = Field(None, alias="json")
    regex: GrammarText | None = None
    choice: Annotated[list[Choice], Field(min_length=1, max_length=256)] | None = None
    grammar: GrammarText | None = Field(None, description="EBNF (GBNF syntax), 'root' rule first.")
    json_object: bool | None = None

    def specs(self) -> list[GrammarSpec]:
        out = []
        if self.json_ is not None:
            out.append(GrammarSpec.json_schema(self.json_))
        if self.regex is not None:
            out.append(GrammarSpec("regex", self.regex))
        if self.choice is not None:
            out.append(GrammarSpec.choice(self.choice))
        if self.grammar is not None:
            out.append(GrammarSpec("grammar", self.grammar))
        if self.json_object:
            out.append(GrammarSpec.json_object())
        return out


_NEUTRAL = (None, False, [], {})
# vLLM / OpenAI fields that would change the output and that loraplex does not implement -> their
# neutral values (sending one of those is fine).
UNSUPPORTED_SAMPLING: dict[str, tuple] = {
    "use_beam_search": _NEUTRAL,
    "length_penalty": (None, 1.0),
    "include_stop_str_in_output": _NEUTRAL,
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": _NEUTRAL,
    "allowed_token_ids": _NEUTRAL,
    "bad_words": _NEUTRAL,
    "prompt_logprobs": _NEUTRAL,
    "logits_processors": _NEUTRAL,
    "guided_decoding_backend": _NEUTRAL,
    "guided_whitespace_pattern": _NEUTRAL,
    "structural_tag": _NEUTRAL,
    "tools": _NEUTRAL,
    "tool_choice": (None, "none", "auto"),
    "functions": _NEUTRAL,
    "function_call": (None, "none", "auto"),
    "prediction": _NEUTRAL,
    "audio": _NEUTRAL,
    "modalities": (None, ["text"]),
    "continue_final_message": _NEUTRAL,
    "chat_template": _NEUTRAL,
    "chat_template_kwargs": _NEUTRAL,
    "documents": _NEUTRAL,
    "prompt_embeds": _NEUTRAL,
}


def _same(value: Any, neutral: Any) -> bool:
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


class _SamplingFields(_Body):
    """Fields shared by completions and chat completions."""

    unsupported: ClassVar[dict[str, tuple]] = UNSUPPORTED_SAMPLING
    model: str = Field(..., description="The base model's served name, or an adapter name.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: off (vLLM extension).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM: drop tokens below min_p * the top one's p.")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Only n (vLLM V1 has no best_of).")
    seed: Seed | None = None
    stop: StopStr | list[StopStr] | None = Field(None, description="Stop string(s); not included in output.")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="vLLM: no EOS / stop before this many tokens.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="vLLM: >1 discourages repeats.")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (as a string) -> bias added to its logit."
    )
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | GrammarText | None = None
    guided_regex: GrammarText | None = None
    guided_choice: Annotated[list[Choice], Field(min_length=1, max_length=256)] | None = None
    guided_grammar: GrammarText | None = None
    adapters: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None,
        description="Weighted composition of adapters, name -> weight (loraplex extension).",
        max_length=64,
    )
    user: str | None = Field(None, description="OpenAI's end-user id: accepted, changes nothing (as vLLM).")
    return_tokens_as_token_ids: bool = Field(
        False, description="vLLM extension: logprobs name tokens as 'token_id:<id>' instead of text."
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, neutral in cls.unsupported.items():
                if name in data and not any(_same(data[name], v) for v in neutral):
                    raise refused(name, f"{name} is not supported by loraplex")
        return data

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value):
        for key in value or {}:
            if not (key.isascii() and key.isdigit()) or int(key) > 2**31 - 1:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.adapters is not None and not self.adapters:
            raise refused("adapters", "adapters must name at least one adapter")
        if self.best_of is not None and self.best_of != self.n:
            raise refused("best_of", "best_of other than n is not supported (as in vLLM V1); use n")
        if len(self.grammar_specs()) > 1:
            raise refused(
                "response_format",
                "give at most one of response_format, structured_outputs and guided_json / "
                "guided_regex / guided_choice / guided_grammar",
            )
        if self.min_tokens and self.grammar_specs():
            raise refused("min_tokens", "min_tokens cannot be combined with structured outputs")
        return self

    def grammar_request(self) -> tuple[str, GrammarSpec] | None:
        """The one output constraint the request asks for, if any, with the field that asked."""
        specs = self.grammar_specs()
        return specs[0] if specs else None

    def grammar_specs(self) -> list[tuple[str, GrammarSpec]]:
        out = (
            [("structured_outputs", s) for s in self.structured_outputs.specs()]
            if self.structured_outputs
            else []
        )
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            out.append(("response_format", GrammarSpec.json_object()))
        elif fmt is not None and fmt.type == "json_schema":
            out.append(("response_format", GrammarSpec.json_schema(fmt.json_schema.schema_)))
        guided = {
            "guided_json": lambda v: GrammarSpec.json_schema(v),
            "guided_regex": lambda v: GrammarSpec("regex", v),
            "guided_choice": lambda v: GrammarSpec.choice(v),
            "guided_grammar": lambda v: GrammarSpec("grammar", v),
        }
        out += [
            (name, make(getattr(self, name)))
            for name, make in guided.items()
            if getattr(self, name) is not None
        ]
        return out

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        items = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in items if s]


class CompletionRequest(_SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)
        ]
    ) = Field(..., description="A string, a token list, or a list of either (one choice set each).")
    max_tokens: int | None = Field(16, ge=1, description="Default 16, as OpenAI's completions.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Logprobs of the sampled tokens and of the k likeliest."
    )
    echo: bool = Field(False, description="Prepend the prompt (and its logprobs, with logprobs) to the text.")
    add_special_tokens: bool = Field(True, description="vLLM: tokenize a text prompt with BOS etc.")
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_unsupported(self):
        if self.suffix:
            raise refused("suffix", "suffix is not supported")
        return self

    def prompt_list(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts (each a string or a token list)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    unsupported: ClassVar[dict[str, tuple]] = {
        **UNSUPPORTED_SAMPLING,
        "echo": _NEUTRAL,
        "add_generation_prompt": (None, True),
    }
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_special_tokens: bool = Field(False, description="vLLM: add BOS etc. on top of the chat template.")

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise refused("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadLoRAAdapterRequest(_Body):
    """vLLM's ``/v1/load_lora_adapter`` body."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Body):
    """vLLM's ``/v1/unload_lora_adapter`` body (``lora_int_id`` accepted and ignored, as in vLLM)."""

    lora_name: str
    lora_int_id: int | None = None


class TokenizeRequest(_Body):
    """vLLM's ``/tokenize`` body: a ``prompt``, or chat ``messages`` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(
        None, description="Default: true for a prompt, false for messages."
    )
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise refused("prompt", "give either prompt or messages")
        return self


class DetokenizeRequest(_Body):
    """vLLM's ``/detokenize`` body."""

    model: str | None = None
    tokens: list[TokenId] = Field(..., max_length=1_000_000)
