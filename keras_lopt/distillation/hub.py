"""keras-hub GPT-2 and Llama models as `TransformerLM`s with the same logits.

The Distiller works on this package's `CausalLM`, whose blocks expose the
mixer that distillation swaps and whose `generate` uses O(1) recurrent
caches. `from_keras_hub` rebuilds a keras-hub model in that form, copying
every weight, so that a keras-hub teacher can be distilled. keras-hub itself
is only needed to build the source model; nothing here imports it.
"""

from keras_lopt.distillation.weights import assign
from keras_lopt.distillation.weights import copy_attention_weights
from keras_lopt.models.causal_lm import TransformerLM

SUPPORTED = ("GPT2Backbone", "GPT2CausalLM", "LlamaBackbone", "LlamaCausalLM")


def is_keras_hub_model(model):
    return type(model).__module__.startswith("keras_hub")


def _is(model, class_name):
    return any(cls.__name__ == class_name for cls in type(model).__mro__)


def _attention_weights(source):
    # keras-hub's attention keeps its projections as EinsumDense layers in the
    # package's convention already: only the names differ.
    weights = {}
    for name in ("query", "key", "value", "output"):
        dense = getattr(source, f"_{name}_dense")
        weights[name] = dense.kernel
        if dense.bias is not None:
            weights[f"{name}_bias"] = dense.bias
    return weights


# Our block's sublayer -> the keras-hub decoder layer's, per architecture.
GPT2_BLOCK = {"mixer_norm": "_self_attention_layer_norm", "mlp_norm": "_feedforward_layer_norm",
              "mlp_in": "_feedforward_intermediate_dense",
              "mlp_out": "_feedforward_output_dense"}
LLAMA_BLOCK = {"mixer_norm": "_self_attention_layernorm", "mlp_norm": "_feedforward_layernorm",
               "mlp_in": "_feedforward_intermediate_dense",
               "mlp_gate": "_feedforward_gate_dense", "mlp_out": "_feedforward_output_dense"}


def _copy_blocks(backbone, lm, names):
    for layer, block in zip(backbone.transformer_layers, lm.blocks):
        copy_attention_weights(_attention_weights(layer._self_attention_layer), block.mixer)
        for ours, theirs in names.items():
            getattr(block, ours).set_weights(getattr(layer, theirs).get_weights())
    lm.final_norm.set_weights(backbone.layer_norm.get_weights())


def _from_gpt2(backbone):
    heads = backbone.num_heads
    lm = TransformerLM(
        backbone.vocabulary_size, backbone.num_layers, backbone.hidden_dim,
        mixer_config=dict(num_heads=heads, key_dim=backbone.hidden_dim // heads, use_bias=True),
        intermediate_dim=backbone.intermediate_dim, norm_epsilon=1e-5, tie_embeddings=True,
        norm="layer", mlp_activation="gelu_tanh", mlp_bias=True,
        max_positions=backbone.max_sequence_length, name="gpt2_as_transformer_lm")
    lm.build()
    # Copied through NumPy (assign), never by reference: on JAX, training the
    # teacher donates its buffers, which would delete the keras-hub model's.
    assign(lm.token_embedding.embeddings, backbone.token_embedding.embeddings, "embeddings")
    lm.position_embedding.set_weights(backbone.position_embedding.get_weights())
    _copy_blocks(backbone, lm, GPT2_BLOCK)
    return lm


def _from_llama(backbone):
    unsupported = []
    if backbone.rope_position_scaling_factor != 1.0:
        unsupported.append(f"rope_position_scaling_factor={backbone.rope_position_scaling_factor}")
    if backbone.rope_frequency_adjustment_factor is not None:
        unsupported.append("rope_frequency_adjustment_factor (Llama 3.1 RoPE scaling)")
    if unsupported:
        raise ValueError("Unsupported Llama variant: " + ", ".join(unsupported) + "; only plain "
                         "RoPE converts.")
    heads = backbone.num_query_heads
    lm = TransformerLM(
        backbone.vocabulary_size, backbone.num_layers, backbone.hidden_dim,
        mixer_config=dict(num_heads=heads, key_dim=backbone.hidden_dim // heads,
                          num_key_value_heads=backbone.num_key_value_heads, rotary=True,
                          rotary_max_wavelength=float(backbone.rope_max_wavelength)),
        intermediate_dim=backbone.intermediate_dim, norm_epsilon=backbone.layer_norm_epsilon,
        tie_embeddings=bool(backbone.tie_word_embeddings), norm="rms", mlp_activation="silu",
        gated_mlp=True, mlp_bias=False, name="llama_as_transformer_lm")
    lm.build()
    embedding = backbone.token_embedding
    assign(lm.token_embedding.embeddings, embedding.embeddings, "embeddings")
    if lm.lm_head is not None:
        assign(lm.lm_head.kernel, embedding.reverse_embeddings, "reverse embeddings")
    _copy_blocks(backbone, lm, LLAMA_BLOCK)
    return lm


def from_keras_hub(model):
    """A `TransformerLM` computing the same logits as a keras-hub GPT-2 or Llama model.

    Every weight is copied. GPT-2: LayerNorms, learned positions, biased
    attention and a tanh-GELU MLP, tied embeddings. Llama: RMSNorms, rotary
    embeddings, grouped-query attention, a SwiGLU MLP, tied or separate
    output embeddings. Positions count real tokens (as `CausalLM` does), so
    left-padded inputs get the positions they would have unpadded.

    Args:
        model: a keras-hub `GPT2Backbone`, `GPT2CausalLM`, `LlamaBackbone`
            or `LlamaCausalLM` (subclasses such as `Llama3Backbone` count).

    Returns:
        A built `TransformerLM`.

    Raises:
        TypeError: another architecture (the message names it).
        ValueError: a Llama with scaled RoPE.

    Example:

    >>> gpt2 = keras_hub.models.GPT2CausalLM.from_preset("gpt2_base_en")
    >>> teacher = from_keras_hub(gpt2)
    >>> Distiller(teacher, student="mamba2")
    """
    backbone = getattr(model, "backbone", model)
    if _is(backbone, "GPT2Backbone"):
        return _from_gpt2(backbone)
    if _is(backbone, "LlamaBackbone"):
        return _from_llama(backbone)
    raise TypeError(
        f"Unsupported keras-hub model {type(model).__name__}: the Distiller converts "
        f"{', '.join(SUPPORTED)} (and subclasses). Other architectures differ in attention or "
        "block layout (e.g. Gemma's logit soft-capping and sliding windows) and are not "
        "converted.")
