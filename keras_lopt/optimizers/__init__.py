"""Learned optimizers for Keras 3: the Keras drivers of `keras_lopt.rules`.

`Celo2`, `Celo2Base` and `Celo` are siblings on one private base class
(`base.LearnedOptimizer`: meta-weights, routing, state, config); each adds
only its rule's update.

After `import keras_lopt` the optimizers also resolve by name, like Keras's
own: `model.compile(optimizer="celo2")`, `keras.optimizers.get("celo2_base")`,
`"celo"` (each at its defaults; the class names work too).
"""

from keras.saving import get_custom_objects as _get_custom_objects

from keras_lopt.optimizers.celo import Celo
from keras_lopt.optimizers.celo2 import Celo2
from keras_lopt.optimizers.celo2 import Celo2Base
from keras_lopt.optimizers.schedules import WarmupCosine
from keras_lopt.optimizers.schedules import warmup_cosine
from keras_lopt.rules.theta import load_theta
from keras_lopt.rules.theta import save_theta

for _cls, _names in (
    (Celo2, ("celo2", "Celo2")), (Celo2Base, ("celo2_base", "Celo2Base")), (Celo, ("celo", "Celo"))
):
    for _name in _names:
        _get_custom_objects()[_name] = _cls
