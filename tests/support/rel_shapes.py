"""The reliability server's shapes (small, so its limits are cheap to reach)."""
SLOTS = 2             # inference.max_batch_size
QUEUE = 4             # server.max_queue
CONTEXT = 256         # inference.max_sequence_length
CACHE_BYTES = 8 << 20  # cache.size: the prefix cache fills during warm-up, so memory can then stay flat

