"""Small causal language models whose token mixer is pluggable.

`TransformerLM`, `LinearAttentionLM`, `MambaLM` and `Mamba2LM` share one
pre-norm decoder: embedding -> blocks of (norm, mixer, residual, norm, MLP,
residual) -> norm -> tied LM head. Only the mixer differs, which is what
cross-architecture distillation swaps. Every mixer has the same three entry
points: `call` (training, whole sequence), `prefill` (a prompt, returning a
cache) and `step` (one token, advancing the cache), and `generate` uses the
last two.
"""

import keras
from keras import ops
from keras.saving import register_keras_serializable

from keras_lopt.layers import rotary
from keras_lopt import backend as _backend

MIXERS = ("attention", "linear_attention", "mamba", "mamba2")
NORMS = ("rms", "layer")
MLP_ACTIVATIONS = {
    "gelu": lambda x: ops.gelu(x, approximate=False),
    "gelu_tanh": lambda x: ops.gelu(x, approximate=True),  # GPT-2's
    "silu": ops.silu,  # Llama's, with gated_mlp=True (SwiGLU)
    "relu": ops.relu,
}


def make_norm(kind, epsilon, name):
    """`"rms"` (RMSNorm, a scale) or `"layer"` (LayerNorm, a scale and a bias)."""
    if kind == "rms":
        return keras.layers.RMSNormalization(epsilon=epsilon, name=name)
    if kind == "layer":
        return keras.layers.LayerNormalization(epsilon=epsilon, name=name)
    raise ValueError(f"Unknown norm {kind!r}; choose from {NORMS}.")


def _check_mlp_activation(name):
    if name not in MLP_ACTIVATIONS:
        raise ValueError(f"Unknown mlp_activation {name!r}; choose from {tuple(MLP_ACTIVATIONS)}.")


def make_mixer(kind, config, name=None):
    """Builds a token-mixing layer from its kind and constructor arguments."""
    config = dict(config or {})
    if kind != "attention" and "max_length" in config:
        # Models saved before the rename (to_mamba2 wrote it) load unchanged.
        config.setdefault("max_sequence_length", config.pop("max_length"))
    if kind == "attention":
        from keras_lopt.layers.attention import CausalSelfAttention

        return CausalSelfAttention(name=name, **config)
    if kind == "linear_attention":
        from keras_lopt.layers.linear_attention import LinearAttention

        return LinearAttention(name=name, **config)
    if kind == "mamba":
        from keras_lopt.layers.mamba import Mamba

        return Mamba(name=name, **config)
    if kind == "mamba2":
        from keras_lopt.layers.mamba2 import Mamba2

        return Mamba2(name=name, **config)
    raise ValueError(f"Unknown mixer {kind!r}; choose from {MIXERS}.")


@register_keras_serializable(package="keras_lopt")
class DecoderBlock(keras.layers.Layer):
    """Pre-norm residual block: `x + mixer(norm(x))`, then `x + mlp(norm(x))`.

    The MLP is `mlp_out(act(mlp_in(h)))`, or gated (SwiGLU with `"silu"`)
    `mlp_out(mlp_in(h) * act(mlp_gate(h)))`.

    Args:
        mixer: `"attention"`, `"linear_attention"`, `"mamba"` or `"mamba2"`.
        mixer_config: constructor arguments of the mixer layer.
        intermediate_dim: hidden width of the MLP; 0 for no MLP (the usual
            Mamba block).
        norm_epsilon: epsilon of the norms.
        norm: `"rms"` or `"layer"`.
        mlp_activation: `"gelu"`, `"gelu_tanh"`, `"silu"` or `"relu"`.
        gated_mlp: multiply by a gate projection (Llama's MLP).
        mlp_bias: biases in the MLP projections.
    """

    def __init__(self, mixer, mixer_config, intermediate_dim, norm_epsilon=1e-5, norm="rms",
                 mlp_activation="gelu", gated_mlp=False, mlp_bias=True, **kwargs):
        super().__init__(**kwargs)
        _check_mlp_activation(mlp_activation)
        self.mixer_kind = mixer
        self.mixer_config = dict(mixer_config or {})
        self.intermediate_dim = int(intermediate_dim)
        self.norm_epsilon = float(norm_epsilon)
        self.norm = norm
        self.mlp_activation = mlp_activation
        self.gated_mlp = bool(gated_mlp)
        self.mlp_bias = bool(mlp_bias)
        self.mixer = make_mixer(mixer, self.mixer_config, name="mixer")
        self.mixer_norm = make_norm(norm, norm_epsilon, "mixer_norm")
        if self.intermediate_dim:
            self.mlp_norm = make_norm(norm, norm_epsilon, "mlp_norm")
            self.mlp_in = keras.layers.Dense(intermediate_dim, use_bias=mlp_bias, name="mlp_in")
            self.mlp_gate = keras.layers.Dense(
                intermediate_dim, use_bias=mlp_bias, name="mlp_gate") if gated_mlp else None
            self.mlp_out = None  # built in build(): needs the model width

    def build(self, input_shape):
        self.mixer_norm.build(input_shape)
        self.mixer.build(input_shape)
        if self.intermediate_dim:
            self.mlp_norm.build(input_shape)
            self.mlp_in.build(input_shape)
            if self.mlp_gate is not None:
                self.mlp_gate.build(input_shape)
            self.mlp_out = keras.layers.Dense(input_shape[-1], use_bias=self.mlp_bias,
                                              name="mlp_out")
            self.mlp_out.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))

    def _mlp(self, x):
        if not self.intermediate_dim:
            return x
        h = self.mlp_norm(x)
        activation = MLP_ACTIVATIONS[self.mlp_activation]
        if self.mlp_gate is None:
            h = activation(self.mlp_in(h))
        else:
            h = self.mlp_in(h) * activation(self.mlp_gate(h))
        return x + self.mlp_out(h)

    def call(self, x, padding_mask=None):
        x = x + self.mixer(self.mixer_norm(x), padding_mask=padding_mask)
        return self._mlp(x)

    def prefill(self, x, padding_mask=None, max_length=None):
        y, cache = self.mixer.prefill(self.mixer_norm(x), padding_mask=padding_mask,
                                      max_length=max_length)
        return self._mlp(x + ops.cast(y, x.dtype)), cache

    def step(self, x, cache):
        y, cache = self.mixer.step(self.mixer_norm(x), cache)
        return self._mlp(x + ops.cast(y, x.dtype)), cache

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            mixer=self.mixer_kind,
            mixer_config=self.mixer_config,
            intermediate_dim=self.intermediate_dim,
            norm_epsilon=self.norm_epsilon,
            norm=self.norm,
            mlp_activation=self.mlp_activation,
            gated_mlp=self.gated_mlp,
            mlp_bias=self.mlp_bias,
        )
        return config


@register_keras_serializable(package="keras_lopt")
class CausalLM(keras.Model):
    """A decoder-only language model with a pluggable token mixer.

    Inputs are int token ids `(batch, length)`, or a dict with `token_ids`
    and an optional `padding_mask` (1 for real tokens; left padding is what
    `generate` expects for prompts of different lengths). Outputs are logits
    `(batch, length, vocab_size)`.

    Args:
        vocab_size: number of token ids.
        num_layers: number of decoder blocks.
        hidden_dim: model width.
        mixer: `"attention"`, `"linear_attention"`, `"mamba"` or `"mamba2"`.
        mixer_config: constructor arguments of the mixer layers.
        intermediate_dim: MLP width (0: no MLP); defaults to `4 * hidden_dim`.
        norm_epsilon: epsilon of the norms.
        tie_embeddings: reuse the token embedding as the output projection.
        norm: `"rms"` (RMSNorm) or `"layer"` (LayerNorm with a bias), for
            the blocks and the final norm.
        mlp_activation: `"gelu"`, `"gelu_tanh"`, `"silu"` or `"relu"`.
        gated_mlp: gated MLP (with `"silu"`: Llama's SwiGLU).
        mlp_bias: biases in the MLP projections.
        max_positions: if > 0, learned absolute position embeddings for
            that many positions (GPT-2); positions count real tokens only,
            like the rotary positions, so left padding does not shift them.

    The defaults are this package's own small LMs; `from_keras_hub` (in
    `keras_lopt.distillation`) sets the options that reproduce GPT-2 and
    Llama exactly.

    Example:

    >>> lm = CausalLM(vocab_size=256, num_layers=2, hidden_dim=64, mixer="mamba2",
    ...               mixer_config={"d_state": 16, "head_dim": 16})
    >>> lm.compile("adamw", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> lm.fit(tokens[:, :-1], tokens[:, 1:])
    >>> lm.generate(prompt, max_new_tokens=20)
    """

    def __init__(self, vocab_size, num_layers, hidden_dim, mixer="attention", mixer_config=None,
                 intermediate_dim=None, norm_epsilon=1e-5, tie_embeddings=True, norm="rms",
                 mlp_activation="gelu", gated_mlp=False, mlp_bias=True, max_positions=0,
                 **kwargs):
        super().__init__(**kwargs)
        if mixer not in MIXERS:
            raise ValueError(f"Unknown mixer {mixer!r}; choose from {MIXERS}.")
        _check_mlp_activation(mlp_activation)
        if norm not in NORMS:
            raise ValueError(f"Unknown norm {norm!r}; choose from {NORMS}.")
        self.norm = norm
        self.mlp_activation = mlp_activation
        self.gated_mlp = bool(gated_mlp)
        self.mlp_bias = bool(mlp_bias)
        self.max_positions = int(max_positions)
        self.vocab_size = int(vocab_size)
        self.num_layers = int(num_layers)
        self.hidden_dim = int(hidden_dim)
        self.mixer = mixer
        self.mixer_config = dict(mixer_config or {})
        self.intermediate_dim = 4 * self.hidden_dim if intermediate_dim is None else int(
            intermediate_dim
        )
        self.norm_epsilon = float(norm_epsilon)
        self.tie_embeddings = bool(tie_embeddings)
        self.token_embedding = keras.layers.Embedding(
            vocab_size, hidden_dim, embeddings_initializer=keras.initializers.RandomNormal(
                stddev=0.02), name="token_embedding"
        )
        self.position_embedding = keras.layers.Embedding(
            self.max_positions, hidden_dim, embeddings_initializer=keras.initializers.RandomNormal(
                stddev=0.02), name="position_embedding") if self.max_positions else None
        self.blocks = [
            DecoderBlock(mixer, self.mixer_config, self.intermediate_dim, norm_epsilon, norm,
                         mlp_activation, gated_mlp, mlp_bias, name=f"block_{i}")
            for i in range(self.num_layers)
        ]
        self.final_norm = make_norm(norm, norm_epsilon, "final_norm")
        self.lm_head = None if tie_embeddings else keras.layers.Dense(
            vocab_size, use_bias=False, name="lm_head"
        )
        self._compiled_step = None

    def build(self, input_shape=None):
        self.token_embedding.build((None, None))
        if self.position_embedding is not None:
            self.position_embedding.build((None, None))
        shape = (None, None, self.hidden_dim)
        for block in self.blocks:
            block.build(shape)
        self.final_norm.build(shape)
        if self.lm_head is not None:
            self.lm_head.build(shape)
        self.built = True

    @staticmethod
    def _unpack(inputs, padding_mask):
        if isinstance(inputs, dict):
            padding_mask = inputs.get("padding_mask", padding_mask)
            inputs = inputs["token_ids"]
        return inputs, padding_mask

    def _embed(self, token_ids, padding_mask=None, positions=None):
        """Token (and position) embeddings; `positions` default to those of the mask."""
        if not keras.backend.is_int_dtype(keras.backend.standardize_dtype(token_ids.dtype)):
            raise TypeError(f"{type(self).__name__} expects integer token ids; received "
                            f"dtype {token_ids.dtype}.")
        x = self.token_embedding(token_ids)
        if self.position_embedding is None:
            return x
        if positions is None:
            length = token_ids.shape[1]
            if length > self.max_positions:
                raise ValueError(f"Sequence length {length} exceeds max_positions="
                                 f"{self.max_positions} of the position embedding.")
            positions = rotary.positions_from_mask(padding_mask, length,
                                                   ops.shape(token_ids)[0])
        return x + ops.cast(self.position_embedding(positions), x.dtype)

    def _logits(self, x):
        x = self.final_norm(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return ops.matmul(x, ops.transpose(ops.cast(self.token_embedding.embeddings, x.dtype)))

    def routing_io_layers(self):
        """`(input_layers, output_layers)` for optimizers' routing
        (`keras_lopt.rules.routing.io_layers`): the token embedding, and
        the head (the token embedding again when the two are tied)."""
        head = self.token_embedding if self.lm_head is None else self.lm_head
        return [self.token_embedding], [head]

    def call(self, inputs, padding_mask=None):
        token_ids, padding_mask = self._unpack(inputs, padding_mask)
        x = self._embed(token_ids, padding_mask)
        for block in self.blocks:
            x = block(x, padding_mask=padding_mask)
        return self._logits(x)

    def mixer_activations(self, inputs, padding_mask=None):
        """Every block's mixer input (after its norm) and mixer output.

        What attention transfer matches layer by layer: the teacher's
        mixer inputs feed the student's mixers, whose outputs must match the
        teacher's.

        Args:
            inputs: int token ids `(batch, length)` or a dict as in `call`.
            padding_mask: optional `(batch, length)`, 1 for real tokens.

        Returns:
            `(mixer_inputs, mixer_outputs)`: two lists with one
            `(batch, length, hidden_dim)` tensor per block.
        """
        token_ids, padding_mask = self._unpack(inputs, padding_mask)
        x = self._embed(ops.convert_to_tensor(token_ids), padding_mask)
        mixer_inputs, mixer_outputs = [], []
        for block in self.blocks:
            h = block.mixer_norm(x)
            y = block.mixer(h, padding_mask=padding_mask)
            mixer_inputs.append(h)
            mixer_outputs.append(y)
            x = block._mlp(x + ops.cast(y, x.dtype))
        return mixer_inputs, mixer_outputs

    def prefill(self, token_ids, padding_mask=None, max_length=None):
        """Runs a prompt; returns its logits and one cache per block.

        `max_length` is the caches' capacity, prompt + generated tokens; only
        softmax attention uses it (its KV cache is preallocated), the
        recurrent mixers ignore it. With position embeddings
        the caches end with `{"position": (batch,)}`, the next position.
        """
        if not self.built:
            self.build()
        token_ids = ops.convert_to_tensor(token_ids)
        x = self._embed(token_ids, padding_mask)
        caches = []
        for block in self.blocks:
            x, cache = block.prefill(x, padding_mask=padding_mask, max_length=max_length)
            caches.append(cache)
        if self.position_embedding is not None:
            real = ops.ones(ops.shape(token_ids), "int32") if padding_mask is None else \
                ops.cast(padding_mask, "int32")
            caches.append({"position": ops.sum(real, axis=1)})
        return self._logits(x), caches

    def step(self, token_ids, caches):
        """Feeds one token per sequence `(batch,)`; returns `(logits, caches)`."""
        token_ids = ops.convert_to_tensor(token_ids)
        positions = None
        if self.position_embedding is not None:
            # Past the table the last position is reused (generate checks the length).
            positions = ops.minimum(caches[-1]["position"], self.max_positions - 1)
        x = self._embed(token_ids, positions=positions)
        new_caches = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.step(x, cache)
            new_caches.append(cache)
        if self.position_embedding is not None:
            new_caches.append({"position": caches[-1]["position"] + 1})
        return self._logits(x), new_caches

    def generate(self, prompt, max_new_tokens, padding_mask=None, temperature=0.0, seed=None):
        """Continues `prompt` token by token using the mixers' caches.

        Args:
            prompt: int `(batch, length)`; left-pad prompts of different
                lengths and pass `padding_mask`.
            max_new_tokens: number of tokens to append.
            padding_mask: optional `(batch, length)`, 1 for real tokens.
            temperature: 0 for greedy decoding, else the sampling temperature.
            seed: seed of the sampler (`temperature > 0`).

        Returns:
            int32 `(batch, length + max_new_tokens)` NumPy array.
        """
        import numpy as np

        prompt = ops.convert_to_tensor(prompt, "int32")
        if len(prompt.shape) != 2:
            raise ValueError(f"prompt must be (batch, length); received {prompt.shape}.")
        length = prompt.shape[1]
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0; received {max_new_tokens!r}.")
        max_new_tokens = int(max_new_tokens)
        if length == 0:
            raise ValueError("generate needs a prompt of at least one token; received shape "
                             f"{tuple(prompt.shape)}.")
        if self.max_positions and length + max_new_tokens > self.max_positions:
            raise ValueError(f"prompt + max_new_tokens = {length + max_new_tokens} exceeds "
                             f"max_positions={self.max_positions}.")
        logits, caches = self.prefill(prompt, padding_mask, max_length=length + max_new_tokens)
        if self._compiled_step is None:
            self._compiled_step = _backend.compile_step(self)
        generator = keras.random.SeedGenerator(seed) if temperature > 0 else None
        tokens = [ops.convert_to_numpy(prompt)]
        last = logits[:, -1]
        for i in range(max_new_tokens):
            if generator is None:
                token = ops.argmax(last, axis=-1)
            else:
                token = keras.random.categorical(
                    ops.cast(last, "float32") / temperature, 1, seed=generator
                )[:, 0]
            token = ops.cast(token, "int32")
            tokens.append(ops.convert_to_numpy(token)[:, None])
            if i + 1 < max_new_tokens:
                last, caches = self._compiled_step(token, caches)
        return np.concatenate(tokens, axis=1).astype("int32")

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            num_layers=self.num_layers,
            hidden_dim=self.hidden_dim,
            mixer=self.mixer,
            mixer_config=self.mixer_config,
            intermediate_dim=self.intermediate_dim,
            norm_epsilon=self.norm_epsilon,
            tie_embeddings=self.tie_embeddings,
            norm=self.norm,
            mlp_activation=self.mlp_activation,
            gated_mlp=self.gated_mlp,
            mlp_bias=self.mlp_bias,
            max_positions=self.max_positions,
        )
        return config


@register_keras_serializable(package="keras_lopt")
class TransformerLM(CausalLM):
    """`CausalLM` with softmax attention (KV cache in `generate`).

    Example:

    >>> lm = TransformerLM(256, num_layers=2, hidden_dim=64,
    ...                    mixer_config={"num_heads": 4, "key_dim": 16, "rotary": True})
    """

    def __init__(self, vocab_size, num_layers, hidden_dim, mixer_config=None, **kwargs):
        kwargs.pop("mixer", None)
        super().__init__(vocab_size, num_layers, hidden_dim, mixer="attention",
                         mixer_config=mixer_config, **kwargs)


@register_keras_serializable(package="keras_lopt")
class LinearAttentionLM(CausalLM):
    """`CausalLM` with `LinearAttention` (fixed-size state in `generate`).

    Example:

    >>> lm = LinearAttentionLM(256, num_layers=2, hidden_dim=64,
    ...                        mixer_config={"num_heads": 4, "key_dim": 16,
    ...                                      "feature_map": "hedgehog"})
    """

    def __init__(self, vocab_size, num_layers, hidden_dim, mixer_config=None, **kwargs):
        kwargs.pop("mixer", None)
        super().__init__(vocab_size, num_layers, hidden_dim, mixer="linear_attention",
                         mixer_config=mixer_config, **kwargs)


@register_keras_serializable(package="keras_lopt")
class MambaLM(CausalLM):
    """`CausalLM` with Mamba-1 blocks; no MLP unless `intermediate_dim` is given.

    Example:

    >>> lm = MambaLM(256, num_layers=2, hidden_dim=64, mixer_config={"d_state": 16})
    """

    def __init__(self, vocab_size, num_layers, hidden_dim, mixer_config=None,
                 intermediate_dim=0, **kwargs):
        kwargs.pop("mixer", None)
        super().__init__(vocab_size, num_layers, hidden_dim, mixer="mamba",
                         mixer_config=mixer_config, intermediate_dim=intermediate_dim, **kwargs)


@register_keras_serializable(package="keras_lopt")
class Mamba2LM(CausalLM):
    """`CausalLM` with Mamba-2 (SSD) blocks; no MLP unless `intermediate_dim` is given.

    Example:

    >>> lm = Mamba2LM(256, num_layers=2, hidden_dim=64,
    ...               mixer_config={"d_state": 16, "head_dim": 16})
    """

    def __init__(self, vocab_size, num_layers, hidden_dim, mixer_config=None,
                 intermediate_dim=0, **kwargs):
        kwargs.pop("mixer", None)
        super().__init__(vocab_size, num_layers, hidden_dim, mixer="mamba2",
                         mixer_config=mixer_config, intermediate_dim=intermediate_dim, **kwargs)
