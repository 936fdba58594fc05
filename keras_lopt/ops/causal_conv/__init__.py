"""Causal depthwise 1-D convolution whose state is the last `width - 1` inputs.

All three forms take `(x, kernel, bias=None, initial_state=None)` and return
`(outputs, final_state)`:

- `chunk_causal_conv`: the whole sequence at once (one chunk: a conv
  has no carried-over work to split);
- `recurrent_causal_conv`: one time step (no time axis);
- `naive_causal_conv`: one output position at a time, the oracle.
"""

from keras_lopt.ops.causal_conv.chunk import chunk_causal_conv
from keras_lopt.ops.causal_conv.naive import naive_causal_conv
from keras_lopt.ops.causal_conv.recurrent import recurrent_causal_conv
