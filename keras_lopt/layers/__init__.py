"""Sequence-mixing layers: softmax attention, linear attention, Mamba, Mamba-2.

One layer per module. Every mixer has a chunked/parallel training form
(`call`) and one cache protocol for generation:

- `init_cache(batch_size, max_length=None)`: an empty cache;
- `prefill(inputs, padding_mask=None, max_length=None)` -> `(outputs, cache)`;
- `step(inputs, cache)` -> `(outputs, cache)`, one token `(batch, d_model)`.

`max_length` is the cache's capacity in tokens: softmax attention's KV cache
needs it, the recurrent mixers (fixed-size state) accept and ignore it. The
kernels behind the recurrent mixers are in `keras_lopt.ops`.
"""

from keras_lopt.layers.attention import CausalSelfAttention
from keras_lopt.layers.feature_maps import EluFeatureMap
from keras_lopt.layers.feature_maps import HedgehogFeatureMap
from keras_lopt.layers.feature_maps import IdentityFeatureMap
from keras_lopt.layers.feature_maps import ReluFeatureMap
from keras_lopt.layers.feature_maps import get_feature_map
from keras_lopt.layers.linear_attention import LinearAttention
from keras_lopt.layers.mamba import Mamba
from keras_lopt.layers.mamba2 import Mamba2
