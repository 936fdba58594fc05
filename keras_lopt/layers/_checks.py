"""Input checks shared by the sequence mixers: clear messages for the
mistakes that otherwise surface as a backend's shape error deep inside an
einsum (or, on TensorFlow, as a silently wrong result)."""

from keras import ops


def check_positive(layer, **values):
    """Each of `values` is an integer >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{layer}: {name} must be a positive integer; received {value!r}.")


def check_width(layer, inputs, width):
    """The last axis of `inputs` is the `width` the layer was built for."""
    if width is not None and inputs.shape[-1] is not None and inputs.shape[-1] != width:
        raise ValueError(f"{layer} was built for inputs of width {width}; received inputs "
                         f"of shape {tuple(inputs.shape)}.")


def check_length(layer, inputs):
    """A sequence `(batch, length, features)` has at least one step."""
    if inputs.shape[1] == 0:
        raise ValueError(f"{layer} received an empty sequence (length 0), shape "
                         f"{tuple(inputs.shape)}: give at least one token.")


def check_mask(layer, padding_mask, inputs):
    """`padding_mask` is `(batch, length)` for `inputs` `(batch, length, ...)`."""
    if padding_mask is None:
        return
    shape = tuple(ops.convert_to_tensor(padding_mask).shape)
    if len(shape) != 2 or (shape[1] is not None and inputs.shape[1] is not None
                           and shape[1] != inputs.shape[1]):
        raise ValueError(f"{layer}: padding_mask must have shape (batch, length) = (batch, "
                         f"{inputs.shape[1]}); received {shape}.")
