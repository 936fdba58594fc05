"""Causal (decayed) linear attention: `S_t = a_t S_{t-1} + k_t v_t^T`, `o_t = q_t^T S_t`.

All three forms take `(q, k, v, log_decay=None, initial_state=None)` and
return `(outputs, final_state)`:

- `chunk_linear_attention` (`chunk_size=` too): training, whole sequence;
- `recurrent_linear_attention`: one time step (no time axis);
- `naive_linear_attention`: the time loop the others are tested against.
"""

from keras_lopt.ops.linear_attention.chunk import chunk_linear_attention
from keras_lopt.ops.linear_attention.naive import naive_linear_attention
from keras_lopt.ops.linear_attention.recurrent import recurrent_linear_attention
