"""Chat templates rendered in child processes, each render bounded in time and memory.

A template comes from the model file: the sandbox (`chat_template._BoundedSandbox`) stops what
it can see, and this module bounds the rest. Renders run in long-lived children
(`python -m woolly.template_worker <bytes>`) whose address space is capped with RLIMIT_AS; a
render that passes `timeout` seconds gets its child killed (a fresh one starts on next use).
A template that timed out, ran out of memory or crashed its child is remembered by hash and
refused at once afterwards, so it costs the timeout once, not every request.

Frames both ways: a 4-byte big-endian length, then msgpack. Request: [source, messages,
add_generation_prompt, specials, template_vars]; answer: {"text"} or {"error", "message"}.
`render` blocks (for up to about `timeout`): call it off the event loop.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from woolly.errors import InvalidRequest, ServerBusy, TokenizerError

STARTUP_TIMEOUT = 60.0   # seconds a new child may take to import and say it is ready
BAD_TEMPLATES = 256      # hashes of templates remembered as bad


@dataclass
class Limits:
    timeout: float = 2.0             # seconds per render
    memory_bytes: int = 512 << 20    # each child's address space
    workers: int = 2                 # children rendering at once


limits = Limits()


def configure(timeout: float | None = None, memory_bytes: int | None = None, workers: int | None = None) -> None:
    """Set the limits (the server's config); running children keep their memory cap until replaced."""
    if timeout is not None:
        limits.timeout = float(timeout)
    if memory_bytes is not None:
        limits.memory_bytes = int(memory_bytes)
    if workers is not None:
        limits.workers = max(1, int(workers))


def render(source: str, messages: list[dict], add_generation_prompt: bool, specials: dict, template_vars: dict) -> str:
    """The rendered prompt; TokenizerError for a bad template, InvalidRequest as `render_here` raises it."""
    return _pool.render(source, [source, messages, add_generation_prompt, specials, template_vars])


class _Failed(Exception):
    """The child did not answer: timed out, or died."""


class _Child:
    def __init__(self, memory_bytes: int):
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # this woolly, whatever the cwd
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "woolly.template_worker", str(memory_bytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self.memory_bytes = memory_bytes
        if _read_frame(self.proc.stdout, time.monotonic() + STARTUP_TIMEOUT) != {"ready": True}:
            raise _Failed("the template worker did not start")

    def call(self, request: bytes, timeout: float) -> dict:
        try:
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
        except OSError:
            raise _Failed("died") from None
        return _read_frame(self.proc.stdout, time.monotonic() + timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Pool:
    """Up to `limits.workers` children; a thread takes an idle one (or starts one) per render."""

    def __init__(self):
        self._cond = threading.Condition()
        self._idle: list[_Child] = []
        self._count = 0
        self._bad: OrderedDict[str, str] = OrderedDict()   # sha256 of a template -> why it is refused

    def render(self, source: str, request: list) -> str:
        key = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
        with self._cond:
            if key in self._bad:
                raise TokenizerError(self._bad[key])
        try:
            frame = _frame(request)
        except (TypeError, msgspec.EncodeError) as e:
            raise InvalidRequest(f"the chat template's variables cannot be passed on: {e}") from None
        child = self._take()
        keep = False
        try:
            answer = child.call(frame, limits.timeout)
            keep = answer.get("error") != "memory"   # a child that hit its cap may be in a poor state
        except _Failed as e:
            why = (f"the chat template took longer than {limits.timeout:g}s to render" if str(e) == "timeout"
                   else "the chat template crashed its renderer")
            raise TokenizerError(self._remember(key, why)) from None
        finally:
            if not keep:
                child.kill()
            self._give(child if keep else None)
        if "text" in answer:
            return answer["text"]
        if answer.get("error") == "memory":
            raise TokenizerError(self._remember(
                key, f"the chat template needed more than {limits.memory_bytes >> 20} MiB of memory to render"))
        if answer.get("error") == "invalid":
            raise InvalidRequest(answer["message"])
        raise TokenizerError(answer.get("message", "the chat template failed"))

    def _remember(self, key: str, why: str) -> str:
        with self._cond:
            self._bad[key] = why
            while len(self._bad) > BAD_TEMPLATES:
                self._bad.popitem(last=False)
        return why

    def _take(self) -> _Child:
        deadline = time.monotonic() + STARTUP_TIMEOUT + 4 * limits.timeout
        with self._cond:
            while not self._idle and self._count >= limits.workers:
                if not self._cond.wait(deadline - time.monotonic()):
                    raise ServerBusy("every chat-template worker is busy; retry later")
            if self._idle:
                child = self._idle.pop()
                if child.proc.poll() is None and child.memory_bytes == limits.memory_bytes:
                    return child
                self._count -= 1
                child.kill()
            self._count += 1
        try:
            return _Child(limits.memory_bytes)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise TokenizerError("the chat-template worker could not start") from None

    def _give(self, child: _Child | None) -> None:
        with self._cond:
            if child is None:
                self._count -= 1
            else:
                self._idle.append(child)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for c in idle:
            c.kill()


_pool = _Pool()
atexit.register(_pool.close)


# -- frames -----------------------------------------------------------------------------------
_encoder = msgspec.msgpack.Encoder()


def _frame(obj) -> bytes:
    body = _encoder.encode(obj)
    return struct.pack(">I", len(body)) + body


def _read_frame(stream, deadline: float) -> dict:
    """One frame from a pipe, waiting until `deadline` (monotonic) -> the decoded object."""
    fd = stream.fileno()
    buf = bytearray()
    need = 4
    header = True
    while True:
        while len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _Failed("timeout")
            chunk = os.read(fd, need - len(buf))
            if not chunk:
                raise _Failed("died")
            buf += chunk
        if not header:
            return msgspec.msgpack.decode(bytes(buf[4:need]))
        need = 4 + struct.unpack(">I", bytes(buf[:4]))[0]
        header = False


# -- the child --------------------------------------------------------------------------------
def _serve(memory_bytes: int) -> None:
    import resource

    from woolly.chat_template import render_here
    from woolly.errors import WoollyError

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    out = sys.stdout.buffer
    stdin = sys.stdin.buffer

    def send(obj) -> None:
        out.write(_frame(obj))
        out.flush()

    send({"ready": True})
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return   # the server closed the pipe
        body = stdin.read(struct.unpack(">I", head)[0])
        try:
            source, messages, agp, specials, template_vars = msgspec.msgpack.decode(body)
            answer = {"text": render_here(source, messages, agp, specials, template_vars)}
        except MemoryError:
            answer = {"error": "memory"}
        except InvalidRequest as e:
            answer = {"error": "invalid", "message": e.message}
        except WoollyError as e:
            answer = {"error": "template", "message": e.message}
        try:
            send(answer)
        except MemoryError:
            send({"error": "memory"})


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
