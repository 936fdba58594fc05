"""The only backend-specific code of `keras_lopt.models`."""

import keras


def compile_step(model):
    """`model.step` compiled where that pays off: `jax.jit` on JAX.

    The jitted function reads the model's current variable values on every
    call (they are passed in, not captured), so training between
    `generate` calls is seen. TensorFlow and torch run `model.step` eagerly.
    """
    if keras.backend.backend() != "jax":
        return model.step
    import jax

    variables = model.trainable_variables + model.non_trainable_variables

    def stateless_step(values, token_ids, caches):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return model.step(token_ids, caches)

    jitted = jax.jit(stateless_step)
    return lambda token_ids, caches: jitted([v.value for v in variables], token_ids, caches)
