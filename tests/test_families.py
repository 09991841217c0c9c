"""The pipeline on the families it is built for, beyond BERT and GPT-2: tiny random checkpoints
of other encoders (RoBERTa's offset positions, DistilBERT without segment ids, ALBERT's factorized
embeddings, DeBERTa-v2's relative attention) and decoders (GPT-Neo, OPT's offset positions),
each saved as a local directory with a tokenizer and run through `run_pipeline` up to verify,
with the optimization profile's max sequence at the model's own position limit."""

from __future__ import annotations

import pytest

from compiler.pipeline import run_pipeline
from compiler.settings import (BuildSettings, DataSettings, EngineSettings, ModelSettings, PrecisionSettings,
                               ProfileSettings)
from tests.models import minilm_tokenizer

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _configs() -> dict:
    import transformers as t

    return {
        # fairseq-style positions: a table of 66 rows, padding index 1, serves 64 tokens
        "roberta": lambda: t.RobertaConfig(vocab_size=30522, max_position_embeddings=66, pad_token_id=1,
                                           type_vocab_size=1, **SMALL),
        "distilbert": lambda: t.DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                 max_position_embeddings=64),
        "albert": lambda: t.AlbertConfig(vocab_size=30522, embedding_size=16, max_position_embeddings=64, **SMALL),
        "deberta-v2": lambda: t.DebertaV2Config(vocab_size=30522, max_position_embeddings=64, **SMALL),
        "gpt-neo": lambda: t.GPTNeoConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2,
                                          attention_types=[[["global", "local"], 1]], window_size=16,
                                          max_position_embeddings=64),
        "opt": lambda: t.OPTConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32),
    }


@pytest.mark.parametrize("arch", list(_configs()))
def test_family_member_compiles_and_verifies_at_its_position_limit(arch, tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    path = tmp_path / arch
    transformers.AutoModel.from_config(_configs()[arch]()).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    settings = BuildSettings(
        model=ModelSettings(name=str(path)), precision=PrecisionSettings(mode="auto"),
        data=DataSettings(samples=4, calib_samples=8, max_length=32, batch_size=4, profile_max_rows=2,
                          cache_dir=str(tmp_path / "cache")),
        engine=EngineSettings(profiles=(ProfileSettings(opt_shape=(1, 32), max_shape=(2, 64)),)),
        output_dir=str(tmp_path / "out"))
    fidelity = run_pipeline(settings, until="verify").report["fidelity"]
    for name in ("real", "random", "profile_max"):
        assert fidelity[name]["nonfinite_count"] == 0, name
        assert fidelity[name]["cosine_min"] > 0.999, (name, fidelity[name])
    assert fidelity["shapes_verified"]["profile_max"] == [2, 64]


def test_a_token_classification_checkpoint_keeps_its_head(tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=5)
    transformers.DistilBertForTokenClassification(config).save_pretrained(tmp_path / "ner")
    minilm_tokenizer().save_pretrained(tmp_path / "ner")
    settings = BuildSettings(
        model=ModelSettings(name=str(tmp_path / "ner"), task="token-classification"),
        precision=PrecisionSettings(mode="hybrid"),
        data=DataSettings(samples=4, calib_samples=8, max_length=32, batch_size=4, profile_max_rows=2,
                          cache_dir=str(tmp_path / "cache")),
        engine=EngineSettings(profiles=(ProfileSettings.fitted(max_shape=(2, 64)),)), output_dir=str(tmp_path / "out"))
    report = run_pipeline(settings, until="verify").report
    assert report["fidelity"]["real"]["outputs"].keys() == {"logits"}
    assert report["fidelity"]["task"]["token_label_agreement"] > 0.9
