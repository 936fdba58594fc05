"""Every public layer, model and loss is registered for Keras serialization
as `keras_lopt>Name` as soon as its module is imported."""

import keras
import pytest

import keras_lopt.distillation
import keras_lopt.layers
import keras_lopt.models

CLASSES = [
    keras_lopt.layers.CausalSelfAttention, keras_lopt.layers.LinearAttention,
    keras_lopt.layers.Mamba, keras_lopt.layers.Mamba2, keras_lopt.layers.IdentityFeatureMap,
    keras_lopt.layers.EluFeatureMap, keras_lopt.layers.ReluFeatureMap,
    keras_lopt.layers.HedgehogFeatureMap, keras_lopt.models.DecoderBlock,
    keras_lopt.models.CausalLM, keras_lopt.models.TransformerLM,
    keras_lopt.models.LinearAttentionLM, keras_lopt.models.MambaLM, keras_lopt.models.Mamba2LM,
    keras_lopt.distillation.Distiller, keras_lopt.distillation.TokenKLDivergence,
    keras_lopt.distillation.AttentionTransferLoss,
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_registered_under_keras_lopt(cls):
    name = f"keras_lopt>{cls.__name__}"
    assert keras.saving.get_registered_name(cls) == name
    assert keras.saving.get_registered_object(name) is cls
