"""Meta-training of learned optimizers (JAX backend).

`config` (the run's hyper-parameters) <- `tasks` (task families) <- `pes`
(the PES estimator, driving `keras_lopt.rules` exactly as the Keras
optimizers do) <- `train` (checkpoints, resume, metrics).
"""

from keras_lopt.meta.config import MetaTrainConfig
from keras_lopt.meta.pes import PESMetaTrainer
from keras_lopt.meta.tasks import TaskFamily
from keras_lopt.meta.tasks import default_families
from keras_lopt.meta.train import load_checkpoint
from keras_lopt.meta.train import meta_train
