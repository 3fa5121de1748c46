"""PrefixCache alone: longest shared prefix, the lookup limit, LRU within bytes, TTL."""
import time

from woolly.engine.prefix_cache import PrefixCache


def test_the_longest_shared_prefix_wins_even_when_no_entry_is_a_whole_prefix():
    c = PrefixCache(max_bytes=100, ttl=60)
    c.store((1, 2, 3, 4, 5), "a", 10)          # system prompt + question A + answer
    c.store((1, 2, 9), "b", 10)
    assert c.lookup([1, 2, 3, 7, 7, 7], limit=5) == (3, "a")
    assert c.lookup([1, 2, 9, 9], limit=3) == (3, "b")
    assert c.lookup([8, 1, 2], limit=2) == (0, None)


def test_the_limit_caps_what_is_reused():
    c = PrefixCache(max_bytes=100, ttl=60)
    c.store((1, 2, 3, 4, 5), "a", 10)
    assert c.lookup([1, 2, 3, 4, 5, 6], limit=2) == (2, "a")
    assert c.lookup([1, 2, 3, 4, 5], limit=4) == (4, "a")


def test_least_recently_used_entries_go_first_when_bytes_run_out():
    c = PrefixCache(max_bytes=25, ttl=60)
    c.store((1,), "one", 10)
    c.store((2,), "two", 10)
    c.lookup([1, 0], limit=1)                  # touch (1,)
    c.store((3,), "three", 10)                 # evicts (2,), the least recently used
    assert set(c.entries) == {(1,), (3,)} and c.bytes == 20
    c.store((4,), "too big", 26)
    assert (4,) not in c.entries


def test_entries_expire_after_the_ttl():
    c = PrefixCache(max_bytes=100, ttl=0.05)
    c.store((1, 2), "a", 10)
    time.sleep(0.1)
    assert c.lookup([1, 2, 3], limit=2) == (0, None) and not c.entries and c.bytes == 0


def test_a_zero_size_cache_keeps_nothing():
    c = PrefixCache(max_bytes=0, ttl=60)
    c.store((1, 2), "a", 1)
    assert c.lookup([1, 2, 3], limit=2) == (0, None)
