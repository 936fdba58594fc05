"""Time-axis padding and chunk counting shared by the chunked kernels."""

from keras import ops

# exp() of this is exactly 0 in float32: masks decays without inf - inf.
NEG = -1e30


def pad_time(x, length, axis=1):
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * len(x.shape)
    widths[axis] = (0, pad)
    return ops.pad(x, widths)


def num_chunks(length, chunk_size):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; received {chunk_size}.")
    return -(-length // chunk_size)


def float32(*tensors):
    return tuple(ops.cast(t, "float32") for t in tensors)
