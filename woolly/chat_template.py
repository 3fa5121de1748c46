"""Chat templates: a conversation rendered to a prompt, and that prompt tokenized safely.

Rendering. The file's `tokenizer.chat_template` (Hugging Face-style Jinja) runs in Jinja2's
`ImmutableSandboxedEnvironment`, set up as Transformers does (trim_blocks, lstrip_blocks,
loop controls, a pass-through `{% generation %}` tag) with `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `strftime_now` and
Transformers' `tojson`. A file without a template gets its family's built-in one (Gemma's
`<start_of_turn>` turns, written to match llama.cpp's built-in "gemma" template), else ChatML.
The template comes from the model file, so it is not trusted. Errors: a template that reaches
for anything unsafe (`__globals__`, `__class__`, ...) is stopped by the sandbox before it runs
anything and raises `TokenizerError`, as does a broken template, one whose output passes
`MAX_PROMPT_CHARS`, or one that builds a huge value (`7**(10**8)`, `'a'*10**9`, `center(1e9)`:
refused by `_BoundedSandbox`, with constant folding off so none is computed while compiling);
`raise_exception(...)` from the template and malformed messages raise `InvalidRequest`. What
the sandbox cannot see (endless nested loops, growth by many small steps) is bounded by where
renders run: `woolly.template_worker`'s child processes, limited in time and memory.

Control tokens come only from the template. `render_chat_spans` renders twice: with the real
messages, and with each message's content replaced by a random marker. The marked rendering
shows which text is the template's own; the real rendering is cut at the same places, each
marker matched to its content as given (or trimmed, as templates often do). `tokenize_chat`
then tokenizes the real prompt in one piece, with control-token text recognized only inside
the template's spans: the same ids llama.cpp gets for ordinary content, while a user's
`<|im_start|>` stays plain text. If a template uses content in ways markers cannot follow
(branching on it, rewriting it), the spans are unknown: the prompt is then parsed normally
when no message holds special-token text (nothing to inject), and refused otherwise.
"""
from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from woolly.errors import InvalidRequest, TokenizerError, WoollyError

MAX_PROMPT_CHARS = 4_000_000      # a rendered prompt longer than this is refused
MAX_TEMPLATE_CHARS = 200_000
MAX_VALUE_SIZE = 1_000_000        # characters or items one template operation may make
MAX_POW_BITS = 4096               # bits of an integer power a template may compute

# llama.cpp's built-in "gemma" template (llm_chat_apply_template): system text folded into the
# first user turn, "assistant" spoken as "model", content trimmed of ASCII whitespace.
GEMMA_TEMPLATE = (
    "{%- set system = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set system.text = system.text + (message['content'] | trim(' \\t\\n\\v\\f\\r')) -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if system.text and role != 'model' -%}{{ system.text + '\\n\\n' }}{%- set system.text = '' -%}{%- endif -%}"
    "{{ (message['content'] | trim(' \\t\\n\\v\\f\\r')) + '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

BUILTIN_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE,
                     "gemma3n": GEMMA_TEMPLATE}


def chat_template_source(model) -> str:
    """The template `model` renders with: the file's, else the family's built-in, else ChatML."""
    source = model.vocabulary.chat_template
    if source:
        return source
    return BUILTIN_TEMPLATES.get(getattr(model, "architecture", ""), CHATML_TEMPLATE)


def template_origin(model) -> str:
    """Where `chat_template_source(model)` comes from: "file" (tokenizer.chat_template),
    "builtin" (the family's, as llama.cpp falls back), or "chatml" (a guess for a file with none)."""
    if model.vocabulary.chat_template:
        return "file"
    return "builtin" if getattr(model, "architecture", "") in BUILTIN_TEMPLATES else "chatml"


_INSTRUCT_WORDS = re.compile(r"(?<![a-z0-9])(instruct|it|chat|sft|dpo|orpo|rlhf|assistant)(?![a-z0-9])", re.I)
_BASE_WORDS = re.compile(r"(?<![a-z0-9])(base|pretrain|pretrained)(?![a-z0-9])", re.I)


def model_kind(model) -> tuple[str, str]:
    """("instruct" | "base", why). The words of general.finetune and general.name decide first (as
    Hugging Face and llama.cpp's converter name them: "Instruct", "it", "chat", "base"), then
    whether the file carries a chat template: llama.cpp and Ollama chat only through one."""
    get = model.gguf.get
    for key in ("general.finetune", "general.name"):
        text = get(key)
        if isinstance(text, str):
            if m := _INSTRUCT_WORDS.search(text):
                return "instruct", f"{key} says {m.group(0)!r}"
            if m := _BASE_WORDS.search(text):
                return "base", f"{key} says {m.group(0)!r}"
    if isinstance(get("tokenizer.chat_template"), str) and get("tokenizer.chat_template"):
        return "instruct", "the file carries a chat template"
    return "base", "no chat template in the file and no instruct/chat in its name"


def base_model_warning(model, once: bool = False) -> str | None:
    """The warning for chatting with a base model (None for an instruct one); `once`: only the
    first time for this model object (a server logs it once, not per request)."""
    kind, why = model_kind(model)
    if kind != "base" or (once and model.__dict__.get("_base_chat_warned")):
        return None
    if once:
        model.__dict__["_base_chat_warned"] = True
    return (f"{model.name} looks like a base model ({why}): it is not tuned for chat, so expect replies "
            "that ramble or make no sense; use an instruct model, or plain completion")


def render_chat(model, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                **template_vars: Any) -> str:
    """The prompt text for `messages` (each a dict with "role" and "content")."""
    source = chat_template_source(model)
    return _render(source, _normalize(messages), add_generation_prompt, _special_texts(model), template_vars)


def render_chat_spans(model, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                      **template_vars: Any) -> tuple[str, list[tuple[int, int]] | None]:
    """The prompt text and the [start, end) spans of it the template wrote itself (None: unknown)."""
    source = chat_template_source(model)
    msgs = _normalize(messages)
    specials = _special_texts(model)
    text = _render(source, msgs, add_generation_prompt, specials, template_vars)
    nonce = secrets.token_hex(8)
    marked_msgs = [dict(m, content=f"\ue000{nonce}:{k}\ue001") for k, m in enumerate(msgs)]
    marked = _render(source, marked_msgs, add_generation_prompt, specials, template_vars)
    parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", marked)
    literals, slots = parts[0::2], [int(k) for k in parts[1::2]]
    return text, _align(text, literals, [msgs[k]["content"] for k in slots])


def tokenize_chat(model, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                  **template_vars: Any) -> list[int]:
    """Prompt ids for `messages`: control tokens only where the template wrote them; BOS added
    as the file asks unless the template already starts with it."""
    tok = model.tokenizer
    text, spans = render_chat_spans(model, messages, add_generation_prompt=add_generation_prompt, **template_vars)
    if spans is None:
        for m in _normalize(messages):
            if tok.tokenize(m["content"], add_bos=False, parse_special=True) != \
                    tok.tokenize(m["content"], add_bos=False, parse_special=False):
                raise InvalidRequest("a message contains control-token text, and this chat template rewrites "
                                     "message content, so it cannot be kept as plain text")
        ids = tok.tokenize(text, add_bos=False, parse_special=True)
    else:
        ids = tok.tokenize(text, add_bos=False, special_spans=spans)
    bos = tok.special_tokens.bos
    if model.vocabulary.add_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


# -- rendering --------------------------------------------------------------------------
class _TemplateRaised(Exception):
    """raise_exception() called by the template."""


def _raise_exception(message: Any = "") -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """Transformers' `{% generation %}...{% endgeneration %}`: renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _check_size(n: Any, what: str) -> None:
    if isinstance(n, (int, float)) and n > MAX_VALUE_SIZE:
        raise SecurityError(f"{what} of {n:.0f} is over the limit of {MAX_VALUE_SIZE}")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, also refusing operations that make huge values at once: integer
    powers past MAX_POW_BITS, repetition (`'a' * n`) and padding widths (center, ljust, rjust,
    zfill, the center and indent filters) past MAX_VALUE_SIZE. Ranges: the sandbox's MAX_RANGE."""

    intercepted_binops = frozenset({"*", "**"})
    PADDING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 \
                and abs(left) > 1 and abs(left).bit_length() * right > MAX_POW_BITS:
            raise SecurityError(f"an integer power over {MAX_POW_BITS} bits")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_size(len(seq) * n, "a repetition")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja2's names)
        if isinstance(getattr(__obj, "__self__", None), str) and getattr(__obj, "__name__", "") in __self.PADDING:
            for a in (*args, *kwargs.values()):
                _check_size(a, f"a {__obj.__name__} width")
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_filter(name: str, position: int, env: jinja2.Environment):
    inner = env.filters[name]

    def bounded(value, *args, **kwargs):
        for a in (*args[position - 1:position], *kwargs.values()):
            _check_size(a, f"a {name} width")
        return inner(value, *args, **kwargs)
    return bounded


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TokenizerError(f"the chat template is {len(source)} characters, over the limit of {MAX_TEMPLATE_CHARS}")
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, optimized=False,   # optimized: constant folding
                          extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    for name in ("center", "indent"):
        env.filters[name] = _bounded_filter(name, 1, env)
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"the chat template does not compile: {e}") from None


def _render(source: str, messages: list[dict], add_generation_prompt: bool, specials: dict[str, str],
            template_vars: Mapping[str, Any]) -> str:
    """`render_here` in a template worker (bounded in time and memory)."""
    from woolly.template_worker import render

    return render(source, messages, add_generation_prompt, specials, dict(template_vars))


def render_here(source: str, messages: list[dict], add_generation_prompt: bool, specials: dict[str, str],
                template_vars: Mapping[str, Any]) -> str:
    """Render in this process (what a template worker runs); MemoryError passes through."""
    template = _compile(source)
    context = dict(template_vars)
    context.update(messages=messages, add_generation_prompt=bool(add_generation_prompt), **specials)
    chunks: list[str] = []
    size = 0
    try:
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > MAX_PROMPT_CHARS:
                raise TokenizerError(f"the chat template's output passed {MAX_PROMPT_CHARS} characters")
            chunks.append(chunk)
    except _TemplateRaised as e:
        raise InvalidRequest(f"the chat template refused the conversation: {e}") from None
    except SecurityError as e:
        raise TokenizerError(f"the chat template tried an unsafe operation and was stopped: {e}") from None
    except (WoollyError, MemoryError):
        raise
    except Exception as e:  # a template bug (undefined names, type errors, recursion, ...)
        raise TokenizerError(f"the chat template failed: {type(e).__name__}: {e}") from None
    return "".join(chunks)


def _special_texts(model) -> dict[str, str]:
    v = model.vocabulary
    return {"bos_token": v.tokens[v.bos_id] if v.bos_id is not None else "",
            "eos_token": v.tokens[v.eos_id] if v.eos_id is not None else ""}


def _normalize(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Messages as plain dicts with string content (text parts joined); raises InvalidRequest."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequest("messages must be a list of {role, content} objects")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequest(f"message {k} must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"message {k} needs a non-empty string role")
        if content is None:
            content = ""
        elif isinstance(content, list):  # OpenAI-style parts: only text is supported
            texts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise InvalidRequest(f"message {k}: only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise InvalidRequest(f"message {k}: content must be a string")
        out.append({**m, "role": role, "content": content})
    return out


def _align(text: str, literals: list[str], contents: list[str]) -> list[tuple[int, int]] | None:
    """Spans of `text` that are the template's literals, given literal/content/literal/...
    order; None where the contents cannot be placed."""
    if not text.startswith(literals[0]):
        return None
    spans: list[tuple[int, int]] = []
    pos = len(literals[0])
    if pos:
        spans.append((0, pos))
    for content, literal in zip(contents, literals[1:]):
        for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip(),
                                   content.strip(" \t\n\v\f\r"))):
            end = pos + len(cand)
            if text.startswith(cand, pos) and text.startswith(literal, end):
                break
        else:
            return None
        pos = end
        if literal:
            spans.append((pos, pos + len(literal)))
        pos += len(literal)
    return spans if pos == len(text) else None
