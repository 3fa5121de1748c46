"""The reliability server's shapes (small, so its limits are cheap to reach)."""
SLOTS = 2             # inference.max_batch_size
QUEUE = 4             # server.max_queue
CONTEXT = 256         # inference.max_sequence_length
CACHE_BYTES = 8 << 20  # cache.size: the prefix cache fills during warm-up, so memory can then stay flat


def long_running(i: int, max_tokens: int) -> dict:
    """A request body that decodes all of max_tokens (<= 200) on SmolLM2: greedy counting never
    reaches end-of-sequence, so tests that need busy slots do not depend on what sampling draws."""
    return {"prompt": f"Count to 500: {i}, {i + 1}, {i + 2}, {i + 3}, {i + 4}, {i + 5}, {i + 6},",
            "max_tokens": max_tokens, "temperature": 0}
