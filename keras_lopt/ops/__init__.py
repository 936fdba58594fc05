"""Sequence kernels: the recurrences behind `keras_lopt.layers`' mixers.

Layout (after flash-linear-attention's `fla/ops/<method>/`): one package per
recurrence, each with three modules that share ONE signature and return
`(outputs, final_state)`:

- `chunk.py`: the training form, parallel inside a chunk of positions and
  sequential across chunks, linear in the sequence length;
- `recurrent.py`: the generation form, ONE time step in (the time axis
  dropped from every per-step argument), the state advanced in O(1);
- `naive.py`: the plain time loop, the oracle the tests hold the other two
  to (slow; not for training).

Packages:

- `linear_attention`: `S_t = a_t S_{t-1} + k_t v_t^T`, `o_t = q_t^T S_t`
  (linear attention, RetNet, and Mamba-2's SSD with `q = C`, `k = B`,
  `v = dt x`, `log a = dt A`);
- `selective_scan`: Mamba-1's per-channel `h_t = exp(delta_t A) h_{t-1} +
  delta_t B_t x_t`, `y_t = C_t . h_t`;
- `causal_conv`: the causal depthwise 1-D convolution in front of Mamba's
  scans, its state the last `width - 1` inputs.

Everything is `keras.ops` code (backend-specific pieces live in
`keras_lopt.backend`), computes in float32 and is differentiable on JAX,
TensorFlow and torch.

Example:

>>> from keras_lopt.ops.linear_attention import chunk_linear_attention
>>> out, state = chunk_linear_attention(q, k, v, log_decay, chunk_size=64)
"""

from keras_lopt.ops import causal_conv
from keras_lopt.ops import linear_attention
from keras_lopt.ops import selective_scan
