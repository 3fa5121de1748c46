"""Pure jnp building blocks (norms, rope, attention, quantized matmul).

Shape legend for the whole code base:
    B batch (slots)   T new tokens   S cache length   N query heads   K kv heads
    G query heads per kv head (N = K*G)   H head dim   D model dim   F ffn dim   V vocab
A weight in numpy order is [out, in]: GGUF dims reversed, `in` being the row (contraction) length.
"""
