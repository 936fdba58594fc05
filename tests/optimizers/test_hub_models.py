"""keras-hub models train with every optimizer on every backend.

On TensorFlow, gradients inside `tf.function` can have a partially unknown
static shape (`(None, 16)`); the optimizers take shapes from the variable
(through its route), never from the gradient, or the rule fails with
`int() ... 'NoneType'`.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_lopt.callbacks import FeedLossAndHorizon
from keras_lopt.optimizers import Celo
from keras_lopt.optimizers import Celo2
from keras_lopt.optimizers import Celo2Base

keras_hub = pytest.importorskip("keras_hub", reason="needs the hub extra (keras-hub)")

VOCAB = 40


def _gpt2():
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16)


def _llama():
    return keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32)


@pytest.mark.parametrize("backbone", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("cls", [Celo2, Celo2Base, Celo], ids=lambda c: c.__name__)
def test_hub_backbone_trains(backbone, cls):
    keras.utils.set_random_seed(0)
    inputs = {
        "token_ids": keras.Input((None,), dtype="int32", name="token_ids"),
        "padding_mask": keras.Input((None,), dtype="int32", name="padding_mask"),
    }
    logits = keras.layers.Dense(VOCAB, name="logits")(backbone()(inputs))
    model = keras.Model(inputs, logits)
    model.compile(optimizer=cls(),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ids = np.random.default_rng(0).integers(0, VOCAB, (8, 12)).astype("int32")
    before = [ops.convert_to_numpy(v).copy() for v in model.trainable_variables]
    callbacks = [FeedLossAndHorizon()] if cls is Celo else []
    history = model.fit({"token_ids": ids, "padding_mask": np.ones_like(ids)}, ids,
                        epochs=2, batch_size=4, verbose=0, callbacks=callbacks)
    assert np.all(np.isfinite(history.history["loss"]))
    moved = [not np.array_equal(b, ops.convert_to_numpy(v))
             for b, v in zip(before, model.trainable_variables)]
    # Llama's untied reverse embedding gets no gradient; everything else moves.
    assert sum(moved) >= len(moved) - 1
    assert history.history["loss"][-1] < history.history["loss"][0]
