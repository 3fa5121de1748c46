"""Request and response bodies of the HTTP API (msgspec), as the reference and OpenAI define them.

Unknown fields are ignored (clients of Ollama and OpenAI send extras); every bound a
request can break is declared here, so a bad value is a 400 before any work starts.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

MAX_TOKENS = 1 << 20
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS)]   # 0 asks for nothing: a 400, as reliability.md says
Temperature = Annotated[float, Meta(ge=0.0, le=100.0)]
Unit = Annotated[float, Meta(ge=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
Penalty = Annotated[float, Meta(gt=0.0, le=100.0)]
SignedPenalty = Annotated[float, Meta(ge=-100.0, le=100.0)]
Seed = Annotated[int, Meta(ge=-(2**63))]   # every 64-bit seed, signed or unsigned: the top is _check_seed's
MAX_SEED = 2**64 - 1                         # (msgspec's bounds stop at int64's)


def _check_seed(seed: int | None) -> None:
    """In a struct's __post_init__: msgspec reports the ValueError as a validation error."""
    if seed is not None and seed > MAX_SEED:
        raise ValueError(f"seed must be at most 2**64-1 ({MAX_SEED}), got {seed}")
Stop = Annotated[list[Annotated[str, Meta(min_length=1, max_length=512)]], Meta(max_length=16)]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
# Ollama's keep_alive: seconds, or a duration ("5m"); -1 keeps the model loaded, 0 unloads it after the request
KeepAlive = Annotated[str, Meta(max_length=32)] | float


class SamplingFields(msgspec.Struct, kw_only=True):
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Unit | None = None
    top_k: TopK | None = None
    min_p: Unit | None = None
    repeat_penalty: Penalty | None = None
    repeat_last_n: Annotated[int, Meta(ge=0, le=256)] | None = None
    presence_penalty: SignedPenalty | None = None
    frequency_penalty: SignedPenalty | None = None
    seed: Seed | None = None
    stop: Stop | str | None = None

    def __post_init__(self):
        _check_seed(self.seed)

    def options(self) -> dict[str, Any]:
        """The generation options the engine takes (None: the engine's default)."""
        names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
                 "presence_penalty", "frequency_penalty", "seed", "stop")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class OllamaOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Ollama's `options` object. Only the names the engine honours are accepted: any other
    (mirostat, num_gpu, ...) is a 400 naming it, rather than being silently ignored."""
    num_predict: MaxTokens | None = None      # -> max_tokens
    num_ctx: Annotated[int, Meta(ge=1)] | None = None   # at most the server's context (checked per request)
    temperature: Temperature | None = None
    top_p: Unit | None = None
    top_k: TopK | None = None
    min_p: Unit | None = None
    repeat_penalty: Penalty | None = None
    repeat_last_n: Annotated[int, Meta(ge=0, le=256)] | None = None
    presence_penalty: SignedPenalty | None = None
    frequency_penalty: SignedPenalty | None = None
    seed: Seed | None = None
    stop: Stop | str | None = None

    def __post_init__(self):
        _check_seed(self.seed)

    def sampling(self) -> dict[str, Any]:
        out = {n: getattr(self, n) for n in self.__struct_fields__ if getattr(self, n) is not None}
        if "num_predict" in out:
            out["max_tokens"] = out.pop("num_predict")
        return out


class OllamaFields(SamplingFields, kw_only=True):
    """The reference's sampling fields plus Ollama's `options` (the top-level field wins where both are set)."""
    ollama_options: OllamaOptions | None = msgspec.field(default=None, name="options")

    def options(self) -> dict[str, Any]:
        opts = self.ollama_options.sampling() if self.ollama_options else {}
        return {**opts, **super().options()}   # num_ctx included: the server checks it against its context


# -- the reference's routes --------------------------------------------------------------------
class Health(msgspec.Struct):
    status: str
    version: str
    uptime: int
    model: str | None = None


class ModelInfoMeta(msgspec.Struct):
    author: str | None
    parameters: str
    license: str | None


class ModelInfo(msgspec.Struct):
    name: str
    size: int
    quantization: str
    loaded: bool
    metadata: ModelInfoMeta


class LoadModelRequest(msgspec.Struct, kw_only=True):
    name: ModelName               # a pulled model's name, or a .gguf path inside the models directory
    gpu_layers: Annotated[int, Meta(ge=0, le=100000)] | None = None
    keep_alive: KeepAlive | None = None   # default: kept until unloaded (or evicted)


class UnloadModelRequest(msgspec.Struct, kw_only=True):
    name: ModelName | None = None   # default: every loaded model


class LoadModelResponse(msgspec.Struct, omit_defaults=True):   # unload's answer has no load_time_ms
    success: bool
    message: str
    load_time_ms: int | None = None


# A request may not bring its own chat template (only the model file's, sandboxed, is used):
# any value but null is a 400 naming the field, rather than being silently ignored.
NoTemplate = Annotated[None, Meta(description="refused: the model's own template is always used")]


class GenerateRequest(OllamaFields, kw_only=True):
    prompt: str
    format: str | dict[str, Any] | None = None   # "json" or a JSON schema, as Ollama (woolly.http.tools)
    grammar: str | None = None                  # GBNF, as llama-server
    stream: bool = False
    model: ModelName | None = None
    keep_alive: KeepAlive | None = None
    template: NoTemplate = None   # Ollama's per-request template override: refused, not silently ignored


class GenerateResponse(msgspec.Struct):
    text: str
    tokens_generated: int
    generation_time_ms: int
    tokens_per_second: float
    finish_reason: str
    prompt_tokens: int = 0


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Annotated[str, Meta(min_length=1, max_length=64)]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None   # an assistant's earlier calls (woolly.http.tools)
    tool_call_id: str | None = None                  # a tool result's call


class ChatRequest(OllamaFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=4096)]
    stream: bool = False
    model: ModelName | None = None
    chat_template: NoTemplate = None
    format: str | dict[str, Any] | None = None   # "json" or a JSON schema, as Ollama (woolly.http.tools)
    grammar: str | None = None                  # GBNF, as llama-server
    keep_alive: KeepAlive | None = None
    template: NoTemplate = None   # Ollama's name for it


class ChatResponse(msgspec.Struct):
    content: str
    role: str
    tokens_generated: int
    generation_time_ms: int
    finish_reason: str
    prompt_tokens: int = 0


class TokenizeRequest(msgspec.Struct, kw_only=True):
    text: str
    add_bos: bool | None = None
    parse_special: bool = False


class TokenizeResponse(msgspec.Struct):
    tokens: list[int]
    count: int


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: Annotated[list[int], Meta(max_length=1 << 20)]


class DetokenizeResponse(msgspec.Struct):
    text: str


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    input: str | Annotated[list[str], Meta(min_length=1, max_length=256)]
    model: ModelName | None = None
    keep_alive: KeepAlive | None = None


class EmbeddingsResponse(msgspec.Struct):
    embeddings: list[list[float]]
    dimensions: int
    model: str


class ErrorBody(msgspec.Struct):
    message: str
    code: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


# -- OpenAI-compatible /v1 ---------------------------------------------------------------------
class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class OpenAIFields(msgspec.Struct, kw_only=True):
    model: str | None = None
    keep_alive: KeepAlive | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Unit | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | str | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    seed: Seed | None = None
    user: str | None = None
    # llama.cpp / Ollama extensions OpenAI clients pass through extra_body
    top_k: TopK | None = None
    min_p: Unit | None = None
    repeat_penalty: Penalty | None = None
    # structured output and tools (woolly.http.tools); the legacy functions API is refused with a 400
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    def __post_init__(self):
        _check_seed(self.seed)
        from woolly.http.tools import check_openai
        check_openai(self.response_format, self.tools, self.tool_choice)
        if self.functions or self.function_call not in (None, "none"):
            raise ValueError("functions and function_call (the legacy API) are not supported: use tools")

    def options(self) -> dict[str, Any]:
        opts = {
            "max_tokens": self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "stop": self.stop,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "seed": self.seed, "top_k": self.top_k, "min_p": self.min_p, "repeat_penalty": self.repeat_penalty,
        }
        return {k: v for k, v in opts.items() if v is not None}


class CompletionRequest(OpenAIFields, kw_only=True):
    prompt: str | Annotated[list[str | int], Meta(max_length=1 << 20)]   # text, [text], or token ids
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False


class ChatCompletionRequest(OpenAIFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=4096)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    chat_template: NoTemplate = None


class OpenAIModel(msgspec.Struct):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "woolly"


class OpenAIErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorResponse(msgspec.Struct):   # OpenAI's own error shape (GET /v1/models/{id} for an unknown id)
    error: OpenAIErrorBody


class OpenAIEmbeddingsRequest(msgspec.Struct, kw_only=True):
    input: str | Annotated[list[str], Meta(min_length=1, max_length=256)]
    model: str | None = None
    keep_alive: KeepAlive | None = None
    encoding_format: Literal["float", "base64"] = "float"   # base64: little-endian float32 bytes
