"""The learned rules as pure math: `keras.ops` functions of (meta-weights,
state, gradient, parameter), with no Keras optimizer around them.

Both drivers call these functions and nothing else for the math: the Keras
optimizers (`keras_lopt.optimizers`) keep the state in optimizer variables,
the meta-trainer (`keras_lopt.meta`) in arrays it `vmap`s and `scan`s.

Modules:

* `celo2`: Celo2's features, accumulators, per-element MLP, Newton-Schulz
  orthogonalisation and `update` of one tensor.
* `celo`: Celo's MLP bank, loss buffer and LSTM scheduler;
  `scheduler_update` (once per update) and `update` (once per tensor).
* `adam`: Adam with decoupled weight decay (Celo2's Adam branch, and the
  meta-trainer's outer optimizer).
* `routing`: `route` and `plan`, the one decision of which tensor takes
  the learned rule and which Adam, and the shape the rule sees it in.
* `theta`: meta-weight formats (keras-lopt `.npz`, the authors' `.state`),
  `load` (shipped weights in `weights/`) and `init_theta`.
* `schedule`: `warmup_cosine`, the deployment schedule's multiplier.
* `guard`: the non-finite skip every update runs under.
"""
