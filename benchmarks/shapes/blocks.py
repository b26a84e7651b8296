"""Random quantised blocks that decode to small weights, so a model of them computes finite
activations through every layer.

The quants and their packed scales are random bytes; only the block scale `d` (and the minimum
scale `dmin`) is set, to a value that keeps every weight within about ±0.05 and centred on zero:
the size of a trained model's weights, without training. Speed depends on the bytes' layout,
never on their values, so these blocks decode as fast as real ones.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

# Per type: where the f16 scales sit in a block, and their values. Q4_K and Q5_K blocks start
# with d then dmin; a weight is d * scale * q - dmin * min, with 6-bit scale and min (up to 63)
# and q up to 15 (Q4_K) or 31 (Q5_K), so dmin = d * (q_max / 2) centres it. Q6_K ends with d;
# a weight is d * scale * (q - 32) with an int8 scale, kept to 1..63 here.
_Q4_D = 5.0e-5  # 63 * 15 * d: at most 0.047
_Q5_D = 2.5e-5  # 63 * 31 * d: 0.049
_Q6_D = 2.5e-5  # 63 * 32 * d: 0.050
_SCALE_BYTES = {Q.Q6_K: slice(192, 208)}


def _f16_bytes(value: float) -> np.ndarray:
    return np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)


def random_blocks(qtype: Q, n_values: int, rng: np.random.Generator) -> np.ndarray:
    """`n_values` weights of type `qtype` as raw block bytes (uint8, one row per block)."""
    values_per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    assert n_values % values_per_block == 0, "rows are whole blocks in these models"
    n_blocks = n_values // values_per_block
    blocks = np.frombuffer(rng.bytes(n_blocks * block_bytes), dtype=np.uint8)
    blocks = blocks.reshape(n_blocks, block_bytes).copy()
    if qtype in (Q.Q4_K, Q.Q5_K):
        d = _Q4_D if qtype == Q.Q4_K else _Q5_D
        q_max = 15 if qtype == Q.Q4_K else 31
        blocks[:, 0:2] = _f16_bytes(d)
        blocks[:, 2:4] = _f16_bytes(d * q_max / 2)  # scale and min are alike on average
    elif qtype == Q.Q6_K:
        blocks[:, _SCALE_BYTES[Q.Q6_K]] = rng.integers(1, 64, (n_blocks, 16), dtype=np.uint8)
        blocks[:, 208:210] = _f16_bytes(_Q6_D)
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return blocks


def tensor_bytes(qtype: Q, n_values: int) -> int:
    """Bytes of `n_values` weights stored as `qtype`."""
    values_per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    return n_values // values_per_block * block_bytes
