"""OpenAI's request and response bodies for /v1 (completions, chat completions, models), as
vLLM's protocol.py keeps them apart from the serving code."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from app.api.schemas import MAX_SEED, Strict, StrictPart, by_shape, plain_schema


class StreamOptions(StrictPart):
    include_usage: bool = False


Prompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Tag("texts")]
    | Annotated[list[int], Tag("ids")]
    | Annotated[list[list[int]], Tag("id_lists")],
    by_shape(
        "Input should be a text, a list of texts, a list of token ids or a list of lists of token ids",
        "texts",
        "text",
        "texts",
        "ids",
        "id_lists",
    ),
    plain_schema(str | list[str] | list[int] | list[list[int]]),
]


class CompletionRequest(Strict):
    model: str | None = None
    prompt: Prompt = Field(description="Texts or token ids")
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, description="vLLM's extension: 1 = off")
    logit_bias: dict[str, float] = Field(
        default_factory=dict, description="Token id (as a string) -> bias in [-100, 100]"
    )
    n: int = Field(1, ge=1, description="Choices per prompt, each its own sequence (not with stream)")
    best_of: int | None = Field(
        None, ge=1, description="Sequences generated per prompt (>= n); the n of highest total logprob are returned"
    )
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Log-probabilities of the chosen token and of this many most likely ones"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="Prepend the prompt's text to each choice (not with logprobs)")
    user: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["length", "stop"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mtp"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- chat completions -----------------------------------------------------------------------


class ContentPart(StrictPart):
    type: Literal["text"]
    text: str


class ChatMessage(StrictPart):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | Annotated[list[ContentPart], Field(min_length=1)]
    # the speaker's name in the prompt, in place of the role's (the chat template's {name});
    # OpenAI's pattern for it: no whitespace and none of < | \ / >
    name: str | None = Field(None, pattern=r"^[^\s<|\\/>]{1,64}$")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


# A chat's messages, and its content parts over all of them, at most: far more than fit the
# contexts of the models this project trains or imports (256 and 1,024 tokens; every message
# renders to a token or more). Each message costs the event loop its validation, the check for
# bad text and its rendering: 0.87 MB bodies of 28,000 short messages held the loop about 90 ms
# each before their refusal (docs/reliability.md, chat-message-body). Counted before any of that.
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 2048


class ChatCompletionRequest(Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="max_tokens' newer name; wins if both")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="Choices, each its own sequence (not with stream)")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, description="vLLM's extension: 1 = off")
    logit_bias: dict[str, float] = Field(default_factory=dict)
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _counted_first(cls, data: Any) -> Any:
        """Too many messages or content parts: refused before any of them is looked at (this
        runs before the body's check for bad text, which walks every message)."""
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list):
            return data
        if len(messages) > MAX_MESSAGES:
            raise PydanticCustomError(
                "too_long", "messages: at most {limit} messages (got {n})", {"limit": MAX_MESSAGES, "n": len(messages)}
            )
        parts = sum(len(c) for m in messages if isinstance(m, dict) and isinstance(c := m.get("content"), list))
        if parts > MAX_CONTENT_PARTS:
            raise PydanticCustomError(
                "too_long",
                "messages: at most {limit} content parts in all (got {n})",
                {"limit": MAX_CONTENT_PARTS, "n": parts},
            )
        return data


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["length", "stop"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
