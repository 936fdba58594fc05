"""Learned optimizers for Keras 3: the Keras drivers of `keras_lopt.rules`.

`Celo2`, `Celo2Base` and `Celo` are siblings on one private base class
(`base.LearnedOptimizer`: meta-weights, routing, state, config); each adds
only its rule's update.
"""

from keras_lopt.optimizers.celo import Celo
from keras_lopt.optimizers.celo2 import Celo2
from keras_lopt.optimizers.celo2 import Celo2Base
from keras_lopt.optimizers.schedules import WarmupCosine
from keras_lopt.optimizers.schedules import warmup_cosine
from keras_lopt.rules.theta import load_theta
from keras_lopt.rules.theta import save_theta
