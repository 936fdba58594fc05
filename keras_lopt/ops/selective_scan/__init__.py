"""Mamba-1's selective scan: `h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t`, `y_t = C_t . h_t`.

All three forms take `(x, delta, a, b, c, initial_state=None)` and return
`(outputs, final_state)`:

- `chunk_selective_scan` (`chunk_size=`, `within_chunk=` too): training;
- `recurrent_selective_scan`: one time step (no time axis);
  `sequential_selective_scan` runs it over a whole sequence with
  `keras.ops.scan` (the baseline the chunked form is benchmarked against);
- `naive_selective_scan`: the time loop the others are tested against.
"""

from keras_lopt.ops.selective_scan.chunk import chunk_selective_scan
from keras_lopt.ops.selective_scan.naive import naive_selective_scan
from keras_lopt.ops.selective_scan.recurrent import recurrent_selective_scan
from keras_lopt.ops.selective_scan.recurrent import sequential_selective_scan
