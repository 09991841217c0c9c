"""Model registry and loading (`compiler.training.models`): registered names, local directories,
content keys, stand-in tokenizers, unknown names."""

from __future__ import annotations

import pytest
import torch

from compiler.errors import UnknownModelError
from compiler.settings import ModelSettings
from compiler.training.models import REGISTRY, load_model
from tests.models import minilm_tokenizer, tiny_bert, tiny_gpt2


def save(module, directory):
    module.save_pretrained(directory)
    minilm_tokenizer().save_pretrained(directory)
    return str(directory)


def test_local_directories_load_with_family_inputs_and_content_key(tmp_path):
    bert = load_model(ModelSettings(name=save(tiny_bert(), tmp_path / "bert")))
    assert (bert.family, bert.input_names) == ("encoder", ["input_ids", "attention_mask", "token_type_ids"])
    gpt2 = load_model(ModelSettings(name=save(tiny_gpt2(), tmp_path / "gpt2")))
    assert (gpt2.family, gpt2.input_names) == ("decoder", ["input_ids", "attention_mask"])
    assert gpt2.vocab_size == 30522 and not gpt2.module.training
    # the key follows the weights' content: the same files give the same key, one changed weight a new one
    assert load_model(ModelSettings(name=str(tmp_path / "bert"))).key == bert.key
    changed = tiny_bert()
    with torch.no_grad():
        changed.pooler.dense.bias[0] += 1.0
    assert load_model(ModelSettings(name=save(changed, tmp_path / "bert"))).key != bert.key


def test_random_weights_use_standard_config_and_stand_in_tokenizer():
    loaded = load_model(ModelSettings(name="gpt2", weights="random"))
    assert loaded.module.config.n_layer == 12 and loaded.vocab_size == 50257
    assert "stands in" in loaded.tokenizer_note
    assert max(loaded.tokenizer.get_vocab().values()) < loaded.vocab_size


@pytest.mark.parametrize("name", ["no-such-model-xyz", "./missing/dir"])
def test_unknown_model_lists_known_names(name):
    with pytest.raises(UnknownModelError) as err:
        load_model(ModelSettings(name=name))
    msg = str(err.value)
    assert all(k in msg for k in REGISTRY) and "--weights random" in msg and "local directory" in msg
