"""Cross-architecture distillation: Transformer -> linear attention -> Mamba-2.

`Distiller` runs the two stages; `to_linear_attention` (stage 1) and
`to_mamba2` (stage 2) are the model surgery it uses (see
`keras_lopt.distillation.convert`); the losses are
`keras.distillation.DistillationLoss` subclasses.
"""

from keras_lopt.distillation.convert import to_linear_attention
from keras_lopt.distillation.convert import to_mamba2
from keras_lopt.distillation.distiller import STAGES
from keras_lopt.distillation.distiller import Distiller
from keras_lopt.distillation.hub import from_keras_hub
from keras_lopt.distillation.losses import AttentionTransferLoss
from keras_lopt.distillation.losses import TokenKLDivergence
