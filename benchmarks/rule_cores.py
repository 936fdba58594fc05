"""Does the jitted Celo2Base rule use a second core? (JAX, issue 15)

Times `celo2.update` (Celo2Base: no orthogonalisation) and `adam.update`
on one (768, 3072) matrix, `jax.jit`, median of 20 calls. Run it under
`taskset -c 0` and `taskset -c 0,1` and compare:

    taskset -c 0   python -m benchmarks.rule_cores one-core
    taskset -c 0,1 python -m benchmarks.rule_cores two-cores
"""

import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keras_lopt.rules import adam  # noqa: E402
from keras_lopt.rules import celo2  # noqa: E402
from keras_lopt.rules import theta as theta_lib  # noqa: E402


def main(label, shape=(768, 3072), calls=20):
    theta = {k: jnp.asarray(v) for k, v in theta_lib.load("celo2", None).items()}
    g = jax.random.normal(jax.random.PRNGKey(0), shape)
    p = 0.02 * g
    rule = jax.jit(lambda s, g, p: celo2.update(theta, s, g, p, 1e-3, orthogonalize=False))
    adam_step = jax.jit(lambda s, g, p: adam.update(s, g, p, 1e-3, 1, bias_correction=True))

    def median_ms(fn, state):
        jax.block_until_ready(fn(state, g, p))
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            jax.block_until_ready(fn(state, g, p))
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))

    zeros = lambda shapes: {k: jnp.zeros(s) for k, s in shapes.items()}  # noqa: E731
    r = median_ms(rule, zeros(celo2.state_shapes(shape)))
    a = median_ms(adam_step, zeros(adam.state_shapes(shape)))
    print(f"{label}: jax {jax.__version__}, {len(os.sched_getaffinity(0))} cores: "
          f"Celo2Base rule {r:.1f} ms, Adam {a:.2f} ms, ratio {r / a:.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
