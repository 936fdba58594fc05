"""Learned optimizers for Keras 3."""

from keras_lopt.optimizers.celo import Celo
from keras_lopt.optimizers.celo2 import Celo2
from keras_lopt.optimizers.celo2 import Celo2Base
from keras_lopt.optimizers.checkpoints import load_theta
from keras_lopt.optimizers.checkpoints import save_theta
