"""Request and response bodies of the HTTP API (msgspec), as the reference and OpenAI define them.

Unknown fields are ignored (clients of Ollama and OpenAI send extras); every bound a
request can break is declared here, so a bad value is a 400 before any work starts.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from woolly import sampling_settings as settings
from woolly.sampling_settings import MAX_TOKENS, check_seed

# The sampling settings' types and bounds are woolly.sampling_settings' (one declaration); here
# only what an API's own contract narrows. max_tokens 0 asks for nothing: a 400, as reliability.md
# says (the library takes it: a prompt's logprobs).
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
# Ollama's keep_alive: seconds, or a duration ("5m"); -1 keeps the model loaded, 0 unloads it after the request
KeepAlive = Annotated[str, Meta(max_length=32)] | float


class _Sampling(msgspec.Struct, kw_only=True):
    """Base of a body carrying the sampling settings: each optional (absent: the engine's default),
    the fields made by `settings.optional_fields`."""

    def __post_init__(self):
        check_seed(self.seed)

    def options(self) -> dict[str, Any]:
        """The generation options the engine takes (None: the engine's default)."""
        return {n: getattr(self, n) for n in settings.NAMES if getattr(self, n) is not None}


def _sampling_struct(name: str, doc: str, overrides: dict[str, Any] | None = None, **config) -> type:
    return msgspec.defstruct(name, settings.optional_fields({"max_tokens": MaxTokens, **(overrides or {})},
                                                            rename=config.pop("rename", None)),
                             bases=(_Sampling,), module=__name__, namespace={"__doc__": doc}, kw_only=True,
                             **config)


SamplingFields = _sampling_struct("SamplingFields", "The reference API's sampling fields (every setting).")

_OllamaSampling = _sampling_struct("_OllamaSampling", "Ollama's names for the settings (num_predict: max_tokens).",
                                   rename={"max_tokens": "num_predict"}, forbid_unknown_fields=True)


class OllamaOptions(_OllamaSampling, kw_only=True, forbid_unknown_fields=True):
    """Ollama's `options` object. Only the names the engine honours are accepted: any other
    (mirostat, num_gpu, ...) is a 400 naming it, rather than being silently ignored."""
    num_ctx: Annotated[int, Meta(ge=1)] | None = None   # at most the server's context (checked per request)

    def sampling(self) -> dict[str, Any]:
        out = self.options()
        if self.num_ctx is not None:
            out["num_ctx"] = self.num_ctx
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


# OpenAI documents narrower bounds than llama.cpp's for these: its contract, kept as overrides.
# The other settings (top_k, min_p, repeat_penalty, repeat_last_n: llama.cpp / Ollama extensions
# that OpenAI clients pass through extra_body) keep the declared bounds.
_OpenAISampling = _sampling_struct("_OpenAISampling", "The settings with OpenAI's bounds where it documents them.", {
    "temperature": Annotated[float, Meta(ge=0.0, le=2.0)],
    "presence_penalty": Annotated[float, Meta(ge=-2.0, le=2.0)],
    "frequency_penalty": Annotated[float, Meta(ge=-2.0, le=2.0)],
})


class OpenAIFields(_OpenAISampling, kw_only=True):
    model: str | None = None
    keep_alive: KeepAlive | None = None
    max_completion_tokens: MaxTokens | None = None   # max_tokens' newer name; wins where both are set
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # structured output and tools (woolly.http.tools); the legacy functions API is refused with a 400
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    def __post_init__(self):
        super().__post_init__()
        from woolly.http.tools import check_openai
        check_openai(self.response_format, self.tools, self.tool_choice)
        if self.functions or self.function_call not in (None, "none"):
            raise ValueError("functions and function_call (the legacy API) are not supported: use tools")

    def options(self) -> dict[str, Any]:
        opts = super().options()
        if self.max_completion_tokens is not None:
            opts["max_tokens"] = self.max_completion_tokens
        return opts


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
