"""Request and response bodies. Every request model rejects unknown fields."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    WithJsonSchema,
    computed_field,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_SEED = 2**63 - 1


def unencodable(data: object, path: str = "") -> str | None:
    """The path of the first string in data that UTF-8 cannot encode (a lone surrogate such as "\\ud800")."""
    return _first_unencodable(data, path) if _any_unencodable(data) else None


_WALKED = (str, dict, list)  # what can hold a string
_SCALARS = frozenset({int, float, bool, type(None)})  # what JSON decodes that holds none


def _any_unencodable(data: object) -> bool:
    """Whether data holds a string that UTF-8 cannot encode: one pass that looks only at strings
    and containers (a list of numbers is passed over in one C loop). Naming the path of every
    element on the way, as _first_unencodable does once a bad string is known to be there,
    cost about 0.7 us an element: a 1 MB body of 500,000 token ids held the event loop for
    0.33 s, in each Strict model the body passed through."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(v for v in item.values() if isinstance(v, _WALKED))
        elif isinstance(item, list) and not _SCALARS.issuperset(map(type, item)):  # token ids: one C loop
            try:  # chat messages, lists of id lists: written out in C, 2-3x faster than a walk
                json.dumps(item, ensure_ascii=False, check_circular=False).encode()
            except UnicodeEncodeError:
                return True
            except (TypeError, ValueError, RecursionError):  # not JSON (built in Python), or deep: walk it
                stack.extend(v for v in item if isinstance(v, _WALKED))
    return False


def _first_unencodable(data: object, path: str) -> str | None:
    """The path of the first bad string, in the body's order. A stack, not recursion: a bad
    string in lists nested 960 deep (json.loads takes them) overran Python's recursion limit,
    a 500 with a traceback."""
    stack: list[tuple[str, object]] = [(path, data)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return where or "body"
            continue
        pairs = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        named = [(f"{where}.{_shown(key)}" if where else _shown(key), key, value) for key, value in pairs]
        for name, key, value in reversed(named):
            stack.append((name, value))
            stack.append((name, key))
    return None


def _shown(key: object) -> str:
    """A key as a path names it: a bad key escaped ("\\udc00"), or the message naming it could
    not be encoded either (a 500)."""
    return str(key).encode("utf-8", "backslashreplace").decode()


def _null_is_the_default(schema: dict[str, Any]) -> None:
    """A Strict model's JSON schema says what its validator does: every optional field also takes
    null (its default), and a field the model lacks may come only as null (dropped): unknown
    fields with a value are errors. Without this the published schema refused what the service
    accepts, and schema-driven clients and fuzzers took the one for the other."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or _allows_null(prop):
            continue
        keep = {k: prop.pop(k) for k in ("title", "description", "default", "deprecated") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **keep}
    schema["additionalProperties"] = {"type": "null"}


def _allows_null(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(_allows_null(p) for p in prop.get("anyOf", ()))


def _shape(value: object) -> str:
    """A value's JSON shape: "text", or for a list, what its first element makes it ("empty",
    "texts", "ids", "id_lists"); "other" for anything else."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return "other"
    if not value:
        return "empty"
    first = value[0]
    return "texts" if isinstance(first, str) else "id_lists" if isinstance(first, list) else "ids"


def by_shape(message: str, empty: str, *tags: str) -> Discriminator:
    """Validates a union of members tagged by shape name (as _shape names them: Tag("ids")...)
    as the one member its value's shape picks; `empty`: the member an empty list is. Pydantic's
    own union tries each member in turn and records an error for every element a member
    refuses: a /v1/completions prompt of 200,000 id lists was refused 200,000 times as a list of
    texts, and as many as a list of ids, before it was read as id lists (171 ms of the event
    loop a 0.8 MB body; docs/reliability.md, id-list-prompt). An element of another shape
    than the first is an error of the member chosen, named by its index; a value of no
    member's shape gets `message`. With it, `plain_schema` keeps the JSON schema the plain
    union's (anyOf)."""

    def pick(value: object) -> str | None:
        shape = _shape(value)
        shape = empty if shape == "empty" else shape
        return shape if shape in tags else None

    return Discriminator(pick, custom_error_type="invalid_shape", custom_error_message=message)


def plain_schema(union: Any) -> WithJsonSchema:
    """The JSON schema of `union` untagged: what clients and fuzzers read for a by_shape union."""
    return WithJsonSchema(TypeAdapter(union).json_schema())


TokenIds = Annotated[
    Annotated[list[int], Tag("ids")] | Annotated[list[list[int]], Tag("id_lists")],
    by_shape("Input should be a list of token ids or a list of lists of token ids", "ids", "ids", "id_lists"),
    plain_schema(list[int] | list[list[int]]),
]
Candidates = Annotated[
    Annotated[list[str], Tag("texts")] | Annotated[list[list[int]], Tag("id_lists")],
    by_shape("Input should be a list of texts or a list of lists of token ids", "texts", "texts", "id_lists"),
    plain_schema(list[str] | list[list[int]]),
]


class StrictPart(BaseModel):
    """A part of a request body (a chat message, generate's parameters): unknown fields are
    errors, and null means "the default" for every field (as OpenAI's and TGI's clients send it,
    e.g. max_tokens=None); the JSON schema says so."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        strict=True,  # no "5" -> 5 coercion
        json_schema_extra=_null_is_the_default,
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: object) -> object:
        if isinstance(data, dict) and None in data.values():  # most parts have no null: no copy
            return {key: value for key, value in data.items() if value is not None}
        return data


class Strict(StrictPart):
    """A whole request body, as StrictPart, whose text is checked for lone surrogates once, as a
    whole. The parts nested in it are not walked again: each chat message used to walk its own
    dict after the body's walk, on the event loop, once per message of a large chat body."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: object) -> object:
        if (where := unencodable(data)) is not None:
            raise PydanticCustomError(
                "invalid_text", "{field}: not valid Unicode text (a lone surrogate)", {"field": where}
            )
        return data


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


INFERENCE_ERRORS = (401, 408, 413, 422, 429, 500, 503, 504)


def error_responses(*codes: int, model: type[BaseModel] = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error envelope (replaces FastAPI's default 422 schema)."""
    return {code: {"model": model, "description": "Error envelope"} for code in codes}


# ---- /predict -------------------------------------------------------------------------------


class PredictRequest(Strict):
    inputs: str | list[str] | None = Field(None, description="A text or a list of texts")
    input_ids: TokenIds | None = Field(None, description="Token ids instead of text")
    top_n: int = Field(5, ge=1, description="Tokens returned per position")
    positions: int | None = Field(
        None,
        ge=1,
        validation_alias=AliasChoices("positions", "k"),
        description="Positions returned, at most the model's head count k; null = k. Deprecated name: k",
    )
    candidates: Candidates | None = Field(
        None, description="Continuations to score for every input (texts or token ids, each at most `positions` tokens)"
    )

    @model_validator(mode="before")
    @classmethod
    def _positions_or_k(cls, data: object) -> object:
        # k is positions' old name: both may be sent while clients migrate, if they agree
        if not isinstance(data, dict) or data.get("k") is None or data.get("positions") is None:
            return data
        if data["k"] != data["positions"]:
            raise PydanticCustomError("conflicting_positions", "positions and k (its deprecated name) differ")
        return {key: value for key, value in data.items() if key != "k"}


class TokenProb(BaseModel):
    id: int
    text: str
    prob: float
    logprob: float


class PositionTop(BaseModel):
    position: int = Field(description="1 = the next token, j = the token j steps ahead")
    top: list[TokenProb]


class Continuation(BaseModel):
    ids: list[int]
    text: str


class CandidateScore(BaseModel):
    ids: list[int]
    text: str
    logprobs: list[float] = Field(description="Per position: log-probability under head j")
    total_logprob: float


class PredictResult(BaseModel):
    input_length: int
    positions: list[PositionTop]
    greedy: Continuation
    candidates: list[CandidateScore] | None = None


class PredictResponse(BaseModel):
    positions: int = Field(description="Positions in each result")
    k: int = Field(deprecated=True, description="Deprecated: the same as positions (its old name)")
    results: list[PredictResult]


# ---- /generate (text-generation-inference's shape) ------------------------------------------


class GenerateParameters(StrictPart):
    max_new_tokens: int = Field(20, ge=1)
    temperature: float | None = Field(None, ge=0.0, description="0 = greedy")
    top_k: int | None = Field(None, ge=0, description="0 = off")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    do_sample: bool = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = Field(default_factory=list, description="Stop sequences")
    details: bool = False
    return_full_text: bool = False
    speculative: bool | None = Field(None, description="Self-speculative decoding; null = the server default")
    repetition_penalty: float | None = Field(
        None, gt=0.0, description="Tokens of the prompt or the output: logit / r if positive, else * r; 1 = off"
    )
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Minus this times each token's count in the output; 0 = off"
    )
    truncate: int | None = Field(None, ge=1, description="Keep only the last this-many input tokens")
    # TGI's other parameters: accepted with their neutral values, a clear 422 otherwise
    best_of: int | None = Field(None, ge=1, description="Only 1 (one sequence) is supported")
    decoder_input_details: bool = Field(
        False,
        description="details.prefill: the input tokens with their log-probabilities under head 1 (implies details; "
        "not with streaming)",
    )
    top_n_tokens: int | None = Field(None, ge=0, description="The most likely tokens at each generated token")
    typical_p: float | None = Field(
        None, gt=0.0, le=1.0, description="Locally typical sampling: the typical set's mass (turns sampling on)"
    )
    watermark: bool = Field(False, description="Not supported: false")
    grammar: dict[str, Any] | None = Field(None, description="Not supported: null")
    adapter_id: str | None = Field(None, description="Not supported: null")


class GenerateRequest(Strict):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class SpeculationDetails(BaseModel):
    enabled: bool
    verify_steps: int
    drafted_tokens: int
    accepted_tokens: int

    @computed_field(description="Tokens emitted per verify pass")  # type: ignore[prop-decorator]
    @property
    def mean_accepted_length(self) -> float:
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 1.0


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="log p(token | the input tokens before it); null for the first")


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    input_length: int
    seed: int | None
    speculation: SpeculationDetails
    prefill: list[PrefillToken] = Field(
        default_factory=list, description="The input tokens, with decoder_input_details (TGI's); else empty"
    )
    tokens: list[Token] | None = None
    top_tokens: list[list[Token]] | None = Field(None, description="Per generated token, with top_n_tokens")


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamEvent(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: Details | None = None


# ---- utilities ------------------------------------------------------------------------------


class TokenizeRequest(Strict):
    inputs: str


class TokenOut(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class TokenizeResponse(BaseModel):
    tokens: list[TokenOut]


class Limits(BaseModel):
    max_input_tokens: int
    max_new_tokens: int
    max_top_n: int
    max_logprobs: int
    max_candidates: int
    # sequential heads: input tokens x candidates per /predict request (MTP_MAX_CANDIDATE_TOKENS)
    max_candidate_tokens: int
    max_inputs_per_request: int
    max_stop_sequences: int
    max_stop_length: int
    max_body_bytes: int
    max_batch_size: int
    # rows decoding at once (MTP_MAX_RUNNING; unset: max_batch_size); more requests wait for a row
    max_running: int
    max_queue_size: int
    request_timeout_s: float
    max_input_chars: int
    max_tokenize_tokens: int
    max_temperature: float
    max_top_k: int
    max_pending_bodies_per_client: int
    body_timeout_s: float
    idle_timeout_s: float
    max_connections: int
    max_header_bytes: int


class InfoResponse(BaseModel):
    model_id: str
    version: str
    model: dict[str, object]
    k: int
    vocab_size: int
    max_seq_len: int
    device: str
    dtype: str
    kv_cache_dtype: str = Field(description="The KV caches' dtype (MTP_KV_CACHE_DTYPE)")
    speculative: bool
    draft_policy: dict[str, Any] | None = Field(
        None, description="Greedy steps' draft count per batch size, from measured step costs and acceptance"
    )
    threads: dict[str, int] | None = Field(
        None, description="CPU: intra-op threads each kind/size of pass runs at now, the count timed fastest"
    )
    thread_timings: dict[str, Any] | None = Field(
        None,
        description="CPU: what `threads` was chosen from: per kind/size, each thread count's recent cost "
        "(ms per expected token for decode steps) and the passes run at it, the re-timings "
        "that a slowing of the chosen count started, and the moves of the choice by the count moved to",
    )
    compiled: dict[str, Any] | None = Field(
        None,
        description="The compiled decode steps (shapes, compile seconds); {error} when compiling failed and "
        "eager steps are served; null with compile off",
    )
    limits: Limits
    auth_required: bool
    # text-generation-inference's flat fields, for clients and dashboards that read them
    model_dtype: str
    model_device_type: str
    max_input_tokens: int
    max_total_tokens: int
    max_best_of: int = 1
    max_stop_sequences: int
    max_concurrent_requests: int
    sha: str | None = Field(None, description="The code's git commit, where the checkout has one")


class HealthResponse(BaseModel):
    status: str
    worker: str
