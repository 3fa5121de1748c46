"""The configuration's numeric settings carry their bounds (msgspec Meta in woolly.config): a value
past one is one line naming the setting, its variable where it has one, the bound and the value;
a value at the bound loads."""
from __future__ import annotations

import pytest

from woolly.config import load_config
from woolly.errors import InvalidRequest


@pytest.mark.parametrize("path,at_bound,past,fragment", [
    (("server", "port"), 65535, 65536, "server.port must be <= 65535, got 65536"),
    (("server", "port"), 1, 0, "server.port must be >= 1, got 0"),
    (("server", "max_json_depth"), 10_000, 10_001, "server.max_json_depth must be <= 10000"),
    (("server", "max_queue"), 0, -1, "server.max_queue must be >= 0, got -1"),
    (("server", "template_timeout"), 0.001, 0.0, "server.template_timeout must be > 0"),
    (("server", "keep_alive_timeout"), 1, 0, "server.keep_alive_timeout must be >= 1"),
    (("inference", "max_batch_size"), 256, 257, "inference.max_batch_size must be <= 256"),
    (("inference", "max_sequence_length"), 16, 15, "inference.max_sequence_length must be >= 16"),
    (("inference", "cpu", "threads"), 1, 0, "inference.cpu.threads must be >= 1"),
    (("cache", "size"), 0, -1, "cache.size must be >= 0"),
    (("logging", "repeat_limit"), 1, 0, "logging.repeat_limit must be >= 1"),
    (("security", "rate_limiting", "requests_per_minute"), 1, 0, "requests_per_minute must be >= 1"),
])
def test_a_numeric_setting_past_its_bound_is_one_line_naming_it(path, at_bound, past, fragment):
    load_config(env={}, overrides={path: at_bound})
    with pytest.raises(InvalidRequest) as e:
        load_config(env={}, overrides={path: past})
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_bound_broken_through_a_variable_names_the_variable():
    with pytest.raises(InvalidRequest, match=r"server.max_connections must be >= 1, got 0 \(set by WOOLLY_MAX_CONNECTIONS too\)"):
        load_config(env={"WOOLLY_MAX_CONNECTIONS": "0"})
