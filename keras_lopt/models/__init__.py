"""Small causal language models built from `keras_lopt.layers` mixers."""

from keras_lopt.models.causal_lm import CausalLM
from keras_lopt.models.causal_lm import DecoderBlock
from keras_lopt.models.causal_lm import LinearAttentionLM
from keras_lopt.models.causal_lm import Mamba2LM
from keras_lopt.models.causal_lm import MambaLM
from keras_lopt.models.causal_lm import TransformerLM
