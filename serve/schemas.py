"""The serving contract: HTTP request and response shapes (the native `/d{depth}/...` routes and OpenAI's
`/v1/...`), and the typed request and events that the ingress and a depth's replica exchange.

HTTP requests are strict, frozen pydantic models (a string where a number belongs is an error, not a
conversion) with nanochat's abuse limits; unknown fields are ignored, as OpenAI clients send many. What
depends on the depth (the context, the vocabulary) is checked by the ingress, which holds each depth's
tokenizer (serve/text.py). Checked once there, a request travels to its replica as a `GenerateRequest` (token
ids in), and comes back as `Echo`, `Token` and `Finish` events (token ids out): the replica does no validation
and no text.
"""

import time
import uuid
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from nanoray.engine import SamplingParams

MAX_MESSAGES, MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS = 500, 8000, 32000  # nanochat's chat_web limits
MAX_PROMPTS = 64  # prompts in one /v1/completions batch
MAX_TOP_K, MAX_TOP_LOGPROBS = 200, 20
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # stop strings: a reply's text is held back by up to the longest one
MAX_LOGIT_BIAS = 300  # tokens a request may bias
MAX_BODY_BYTES = 4 * 2**20  # request bodies: 64 prompts that fill a 2048-token context take ~1 MB
MODEL_PREFIX = "nanoray-d"


def model_id(depth: int) -> str:
    return f"{MODEL_PREFIX}{depth}"


class Frozen(BaseModel):
    """Immutable once made: a value passed along, not a record to edit."""
    model_config = ConfigDict(frozen=True)


class Strict(Frozen):
    """Null for an optional field is "not given" (many OpenAI clients send every unset field as null): a field
    that allows null keeps it (its meaning is documented there, e.g. top_k null = off); one that does not gets
    its default. Null for a required field (model, messages, prompt) stays an error naming it."""
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {k: v for k, v in data.items()
                    if not (v is None and k in fields and not fields[k].is_required()
                            and type(None) not in get_args(fields[k].annotation))}
        return data


# Requests -------------------------------------------------------------------------------------------


def unicode(text: str) -> str:
    """Text that UTF-8 can hold: JSON may carry a lone surrogate ("\\ud800"), refused alike in every field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {e.start}") from None
    return text


class Message(Strict):
    """One chat turn; a leading system (or developer) message is merged into the first user turn."""
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="who speaks; system (or developer, OpenAI's newer name for it) only first")
    content: str = Field(max_length=MAX_MESSAGE_CHARS, description="the turn's text, or a list of text parts "
                                                                   "({type: text, text}) joined by newlines")

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content):
        """OpenAI's content parts, where they are text, joined by newlines as vLLM joins them."""
        if isinstance(content, list):
            texts = []
            for i, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"part {i} is not a text part ({{\"type\": \"text\", \"text\": ...}}), got "
                                     f"{kind!r}: this server takes text only")
                texts.append(part["text"])
            content = "\n".join(texts)
        return unicode(content) if isinstance(content, str) else content


class Sampling(Strict):
    """Sampling knobs shared by every generating route."""
    temperature: float = Field(0.8, ge=0, le=2, description="0 = greedy")
    top_k: int | None = Field(50, ge=0, le=MAX_TOP_K, description="keep the k most likely tokens; 0 or null = off")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling; null or 1 = off")
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same prompt, same params: same text")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; null = up to the model's context")
    logit_bias: dict[str, float] | None = Field(None, description=f"token id (a string, as JSON keys are) -> a "
                                                f"bias in [-100, 100] added to its logit; at most {MAX_LOGIT_BIAS}")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="subtracted from the logit of each token the "
                                                                 "reply already holds")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="subtracted from the logit of each token the "
                                                                  "reply already holds, times how often")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias):
        if bias is not None:
            if len(bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}")
            for token, value in bias.items():
                if not (token.isascii() and token.isdigit()):
                    raise ValueError(f"keys are token ids, got {token!r}")
                if not -100 <= value <= 100:
                    raise ValueError(f"biases are in [-100, 100], got {value} for token {token}")
        return bias

    @property
    def most_tokens(self) -> int | None:
        """The tokens asked for (null: up to the context), under whichever name the route takes."""
        return self.max_tokens


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
    messages: list[Message] = Field(description="the conversation so far, the model's turn next")
    stream: bool = Field(True, description="server-sent events (true) or one JSON reply (false)")

    _messages = field_validator("messages")(_check_messages)


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="a last chunk with the token counts")


class OpenAIRequest(Sampling):
    """What /v1/chat/completions and /v1/completions share. OpenAI's defaults: temperature 1, no top-k."""
    model: str = Field(description="nanoray-d{depth}, as GET /v1/models lists them")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="an extension: OpenAI has no top-k")
    stream: bool = Field(False, description="server-sent chunks, then data: [DONE]")
    stream_options: StreamOptions | None = Field(None, description="what a stream adds")
    n: Literal[1] = Field(1, description="choices per prompt: one")
    stop: str | list[str] | None = Field(None, validate_default=True,
                                         description=f"up to {MAX_STOPS} strings (of at most {MAX_STOP_CHARS} "
                                                     f"characters) that end the text")

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [unicode(s) for s in ([stop] if isinstance(stop, str) else stop or [])]
        if len(stops) > MAX_STOPS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters, got "
                             f"{len(stops)} of lengths {[len(s) for s in stops][:MAX_STOPS + 1]}")
        return stops


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""
    messages: list[Message] = Field(description="the conversation so far, the model's turn next")
    logprobs: bool = Field(False, description="each generated token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token, with logprobs")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")

    _messages = field_validator("messages")(_check_messages)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top, info: ValidationInfo):
        if top and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top

    @property
    def most_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions. `echo` + `logprobs` + `max_tokens: 0` scores a text (lm-eval-harness's
    loglikelihood): every prompt token's logprob given the ones before it."""
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, token ids, or a batch of either (one choice each)")
    max_tokens: int | None = Field(16, ge=0, description="tokens to generate; 0 = none (score the prompt)")
    echo: bool = Field(False, description="the prompt first, in the text and the logprobs")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="each token's logprob and this many alternatives; null = none")
    best_of: int | None = Field(None, description="candidates to sample and choose from: 1 (this server samples one)")
    suffix: str | None = Field(None, description="text after the completion (insertion): not supported")

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
            if isinstance(p, str):
                unicode(p)
        return prompts

    @field_validator("best_of")
    @classmethod
    def _one(cls, best_of):
        if best_of not in (None, 1):
            raise ValueError(f"only 1: this server samples one candidate per prompt, got {best_of}")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix):
        if suffix:
            raise ValueError("not supported: these models complete text, they do not insert it")
        return suffix


class TokenizeRequest(Strict):
    """POST /tokenize (vLLM's): a text, or chat turns, to the token ids this server would give the model."""
    model: str | None = Field(None, description="nanoray-d{depth}; null: the tokenizer every served depth shares")
    prompt: str | None = Field(None, description="a text; special-token strings in it (\"<|bos|>\") are those "
                                                 "tokens, as in /v1/completions")
    messages: list[Message] | None = Field(None, description="chat turns instead, rendered as /v1/chat/completions "
                                                             "renders them (<|bos|> first, <|assistant_start|> last)")
    add_special_tokens: bool = Field(True, description="prompt: <|bos|> first, as /v1/completions puts it before "
                                                       "a text (lm-eval asks false)")

    @field_validator("prompt")
    @classmethod
    def _unicode(cls, prompt):
        return prompt if prompt is None else unicode(prompt)

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages):
        return messages if messages is None else _check_messages(messages)


class DetokenizeRequest(Strict):
    """POST /detokenize (vLLM's): token ids to their text."""
    model: str | None = Field(None, description="nanoray-d{depth}; null: the tokenizer every served depth shares")
    tokens: list[int] = Field(description="token ids; special tokens come out as their strings (\"<|bos|>\")")


class CoreRequest(Strict):
    """POST /d{depth}/core."""
    tasks: Literal["core-lite", "core"] = Field("core-lite", description="core needs the DCLM eval bundle")
    max_per_task: int | None = Field(100, ge=1, description="examples per task; null = all (slow on CPU)")


# Between the ingress and a depth's replica -----------------------------------------------------------


class GenerateRequest(Frozen):
    """One request for a depth's replica, already checked against that depth by the ingress: the prompt's
    token ids are in the vocabulary and leave room in the context for `sampling.max_tokens`."""
    prompt: list[int] = Field(description="token ids, BOS (and the chat rendering) included")
    sampling: SamplingParams | None = Field(description="what to sample (max_tokens clipped to the context); "
                                                        "None: nothing (an echo that only scores the prompt)")
    stop_ids: list[int] = Field(description="tokens that end the text; they are not streamed")
    score_prompt: int | None = Field(None, description="first send the prompt scored (Echo), with this many "
                                                      "alternatives per token; None: no")
    score_stop: bool = Field(False, description="end a text that a stop token ended with that token, scored "
                                                "(Finish.stop_token), as vLLM does for completions")


class Token(Frozen):
    """A token of the prompt or of the reply, with the model's own logprobs (before temperature and filters)."""
    id: int = Field(description="token id")
    logprob: float | None = Field(description="log p(token | the tokens before it); None for the first token")
    top: dict[int, float] = Field({}, description="the most likely tokens at this position and their logprobs")


class Echo(Frozen):
    """The replica's first event when the request asked score_prompt."""
    prompt: list[Token] = Field(description="every prompt token, scored")


class Finish(Frozen):
    """The replica's last event."""
    reason: Literal["stop", "length"] = Field(description="stop: a stop token; length: max_tokens or the context")
    stop_token: Token | None = Field(None, description="the stop token that ended the text, when score_stop asked")


Event = Echo | Token | Finish


# Errors ---------------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str = Field(description="what is wrong, starting with the field")
    type: str = Field("invalid_request_error", description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = Field(None, description="the field at fault, as a path: messages[2].role")
    code: str | None = Field(None, description="a stable name for the error, e.g. context_length_exceeded")


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
    depth: int = Field(description="layers")
    params: int = Field(description="total parameters")
    seq_len: int = Field(description="context length in tokens")
    vocab_size: int


class Tokens(BaseModel):
    """POST /tokenize's answer (vLLM's shape)."""
    tokens: list[int]
    count: int = Field(description="len(tokens)")
    max_model_len: int = Field(description="the model's context in tokens (null model: the shortest served)")


class Text(BaseModel):
    """POST /detokenize's answer (vLLM's shape)."""
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info (vLLM's): what a client that tokenizes through this server needs (lm-eval's
    tokenizer_backend=remote reads bos_token and eos_token, and finds their ids through /tokenize)."""
    tokenizer_class: str = "nanoray"
    bos_token: str = Field(description="what every document starts with in training")
    eos_token: str = Field(description="what ends a text: the next document's <|bos|> (chat replies end at "
                                       "<|assistant_end|>)")
    pad_token: str | None = None
    model_max_length: int = Field(description="the model's context in tokens (null model: the shortest served)")
    vocab_size: int
    special_tokens: dict[str, int] = Field(description="every special token and its id")


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
    token: str = Field(description="the token's text (U+FFFD where its bytes are part of a character)")
    logprob: float
    bytes: list[int] = Field(description="the token's UTF-8 bytes")


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
