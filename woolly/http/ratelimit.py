"""One request budget per client, shared by HTTP routes, failed key checks and WebSocket messages.

The identity is the API key (hashed) when keys are required and the request's key is valid,
else the client address: a made-up bearer on a keyless server, or a wrong key, is the address.
Routes are counted by Litestar's RateLimitMiddleware; `ClientLimiter.hit` counts the rest
(a refused key, a WebSocket generate/chat message) in the same store under the same key.
"""
from __future__ import annotations

import hashlib

from litestar import Litestar, Request
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.types import Scope

STATE_KEY = "client_identity"   # scope["state"][STATE_KEY], set by the auth middleware


def address_identity(scope: Scope) -> str:
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


def key_identity(key: bytes) -> str:
    return "key:" + hashlib.sha256(key).hexdigest()[:16]


def client_identity(request: Request) -> str:
    """RateLimitConfig's identifier: what the auth middleware decided, else the address."""
    return request.scope.get("state", {}).get(STATE_KEY) or address_identity(request.scope)


def rate_limit_config(requests_per_minute: int, exclude: list[str]) -> RateLimitConfig:
    return RateLimitConfig(rate_limit=("minute", requests_per_minute), exclude=exclude,
                           identifier_for_request=client_identity)


class ClientLimiter:
    """Counts one request against an identity, in the store and with the history RateLimitMiddleware uses."""

    def __init__(self, config: RateLimitConfig):
        self.config = config
        self.counter = config.middleware_class(app=None, config=config)   # for its history methods

    async def hit(self, app: Litestar, identity: str) -> dict[str, str] | None:
        """Count one request; None when within budget, else the 429's headers (Retry-After included)."""
        store = self.config.get_store_from_app(app)
        key = f"{type(self.counter).__name__}::{identity}"   # RateLimitMiddleware.cache_key_from_request's
        history = await self.counter.retrieve_cached_history(key, store)
        if len(history.history) >= self.counter.max_requests:
            headers = self.counter.create_response_headers(history)
            return {**headers, "Retry-After": str(max(1, int(headers.get("RateLimit-Reset", 60))))}
        await self.counter.set_cached_history(key=key, cache_object=history, store=store)
        return None
