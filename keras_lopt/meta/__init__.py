"""Meta-training of learned optimizers (JAX backend)."""

from keras_lopt.meta.pes import MetaTrainConfig
from keras_lopt.meta.pes import PESMetaTrainer
from keras_lopt.meta.tasks import TaskFamily
from keras_lopt.meta.tasks import default_families
from keras_lopt.meta.train import load_checkpoint
from keras_lopt.meta.train import meta_train
