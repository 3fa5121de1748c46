"""A request that keeps a slot busy for a known number of steps."""
def long_running(i: int, max_tokens: int) -> dict:
    """A request body that decodes all of max_tokens (<= 200) on SmolLM2: greedy counting never
    reaches end-of-sequence, so tests that need busy slots do not depend on what sampling draws."""
    return {"prompt": f"Count to 500: {i}, {i + 1}, {i + 2}, {i + 3}, {i + 4}, {i + 5}, {i + 6},",
            "max_tokens": max_tokens, "temperature": 0}
