"""Attention-free sequence layers: linear attention and Mamba.

Every mixer here has a chunked/parallel training form (`call`), and a
recurrent form for generation (`prefill` a prompt into a cache, then `step`
one token at a time).
"""

from keras_lopt.layers import scan
from keras_lopt.layers.attention import CausalSelfAttention
from keras_lopt.layers.feature_maps import EluFeatureMap
from keras_lopt.layers.feature_maps import HedgehogFeatureMap
from keras_lopt.layers.feature_maps import IdentityFeatureMap
from keras_lopt.layers.feature_maps import ReluFeatureMap
from keras_lopt.layers.feature_maps import get_feature_map
from keras_lopt.layers.linear_attention import LinearAttention
from keras_lopt.layers.mamba import Mamba
from keras_lopt.layers.mamba import Mamba2
