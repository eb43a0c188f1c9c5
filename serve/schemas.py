"""Request and response shapes of the HTTP API: the native `/d{depth}/...` routes and OpenAI's `/v1/...`.

Requests are strict pydantic models (a string where a number belongs is an error, not a conversion) with
nanochat's abuse limits; unknown fields are ignored, as OpenAI clients send many. Depth-dependent bounds
(max_tokens <= the model's context) are checked by the routes, which know the model.
"""

import time
import uuid
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES, MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS = 500, 8000, 32000  # nanochat's chat_web limits
MAX_PROMPTS = 64  # prompts in one /v1/completions batch
MAX_TOP_K, MAX_TOP_LOGPROBS, MAX_STOPS = 200, 20, 4
MODEL_PREFIX = "nanoray-d"


def model_id(depth: int) -> str:
    return f"{MODEL_PREFIX}{depth}"


class Strict(BaseModel):
    """Null for an optional field is "not given" (many OpenAI clients send every unset field as null): a field
    that allows null keeps it (its meaning is documented there, e.g. top_k null = off); one that does not gets
    its default. Null for a required field (model, messages, prompt) stays an error naming it."""
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {k: v for k, v in data.items()
                    if not (v is None and k in fields and not fields[k].is_required()
                            and type(None) not in get_args(fields[k].annotation))}
        return data


class Message(Strict):
    """One chat turn; a leading system message is merged into the first user turn."""
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class Sampling(Strict):
    """Sampling knobs shared by every generating route."""
    temperature: float = Field(0.8, ge=0, le=2, description="0 = greedy")
    top_k: int | None = Field(50, ge=0, le=MAX_TOP_K, description="keep the k most likely tokens; 0 or null = off")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling; null or 1 = off")
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same prompt, same params: same text")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; null = up to the model's context")


def _check_messages(messages: list[Message]) -> list[Message]:
    if not messages:
        raise ValueError("must hold at least one message")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    total = sum(len(m.content) for m in messages)
    if total > MAX_TOTAL_CHARS:
        raise ValueError(f"at most {MAX_TOTAL_CHARS} characters in all, got {total}")
    return messages


class ChatRequest(Sampling):
    """POST /d{depth}/chat."""
    messages: list[Message]
    stream: bool = Field(True, description="server-sent events (true) or one JSON reply (false)")

    _messages = field_validator("messages")(_check_messages)


class StreamOptions(Strict):
    include_usage: bool = False


class OpenAIRequest(Sampling):
    """What /v1/chat/completions and /v1/completions share. OpenAI's defaults: temperature 1, no top-k."""
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="an extension: OpenAI has no top-k")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    stop: str | list[str] | None = Field(None, validate_default=True,
                                         description=f"up to {MAX_STOPS} strings that end the text")

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or not all(stops):
            raise ValueError(f"up to {MAX_STOPS} non-empty strings")
        return stops


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""
    messages: list[Message]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")

    _messages = field_validator("messages")(_check_messages)

    @model_validator(mode="after")
    def _max_tokens(self):
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions. `echo` + `logprobs` + `max_tokens: 0` scores a text (lm-eval-harness's
    loglikelihood): every prompt token's logprob given the ones before it."""
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"1 to {MAX_PROMPTS} prompts")
        for p in prompts:
            if isinstance(p, list) and not p:
                raise ValueError("a token prompt must hold at least one token")
            if len(p) > MAX_TOTAL_CHARS:
                raise ValueError(f"at most {MAX_TOTAL_CHARS} characters (or tokens) per prompt, got {len(p)}")
        return prompts


class CoreRequest(Strict):
    """POST /d{depth}/core."""
    tasks: Literal["core-lite", "core"] = Field("core-lite", description="core needs the DCLM eval bundle")
    max_per_task: int | None = Field(100, ge=1, description="examples per task; null = all (slow on CPU)")


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape; every 4xx and 5xx of this API has it."""
    error: ErrorBody


# Responses ------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


class ModelCard(BaseModel):
    """One entry of GET /v1/models, with the family's own facts added."""
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoray"
    depth: int
    params: int
    seq_len: int
    vocab_size: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatReply(BaseModel):
    """POST /d{depth}/chat with stream false; streamed, the same fields come in the final `done` event."""
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Envelope(BaseModel):
    """What OpenAI's completion objects share: an id, when, which model, and the token counts where known."""
    id: str
    created: int
    model: str
    usage: Usage | None = None


class ChatCompletion(Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: parallel lists over the (echoed and) generated tokens."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
