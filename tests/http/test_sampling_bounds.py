"""The sampling settings' bounds on the live server: one declaration (woolly.sampling_settings),
so repeat_last_n past the device's penalty window is a 400 naming it on every route, and the
window itself is served (penalties on, over all of it)."""
from __future__ import annotations

import pytest

from support.errors import assert_error
from woolly.sampling_settings import RECENT_WINDOW

pytestmark = pytest.mark.real

ROUTES = [
    ("/api/generate", {"prompt": "Hi"}, lambda v: {"repeat_last_n": v}),
    ("/api/generate", {"prompt": "Hi"}, lambda v: {"options": {"repeat_last_n": v}}),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]}, lambda v: {"repeat_last_n": v}),
    ("/v1/completions", {"prompt": "Hi"}, lambda v: {"repeat_last_n": v}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, lambda v: {"repeat_last_n": v}),
]


@pytest.mark.parametrize("route,body,setting", ROUTES)
def test_repeat_last_n_past_the_window_is_a_400_naming_it(http, route, body, setting):
    r = http.post(route, json={**body, **setting(RECENT_WINDOW + 44), "max_tokens": 2})
    assert "repeat_last_n" in assert_error(r, 400, "INVALID_REQUEST")["message"]


@pytest.mark.parametrize("route,body,setting", ROUTES)
def test_repeat_last_n_at_the_window_is_served(http, route, body, setting):
    r = http.post(route, json={**body, **setting(RECENT_WINDOW), "repeat_penalty": 1.3, "max_tokens": 2,
                               "temperature": 0})
    assert r.status_code == 200, r.text
