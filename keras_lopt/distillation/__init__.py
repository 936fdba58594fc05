"""Cross-architecture distillation: Transformer -> linear attention -> Mamba-2.

`to_linear_attention` (stage 1) and `to_mamba2` (stage 2) build the student
models by copying the teacher's weights; see `keras_lopt.distillation.convert`.
"""

from keras_lopt.distillation.convert import to_linear_attention
from keras_lopt.distillation.convert import to_mamba2
