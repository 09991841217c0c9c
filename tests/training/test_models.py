"""Model registry and loading (`compiler.training.models`): registered names, local directories,
content keys, stand-in tokenizers, unknown names."""

from __future__ import annotations

import pytest
import torch

from compiler.errors import UnknownModelError
from compiler.settings import ModelSettings
from compiler.training.models import REGISTRY, load_model
from tests.models import minilm_tokenizer, tiny_bert, tiny_gpt2


@pytest.fixture(scope="module")
def texts():
    from calibration import load_texts
    from compiler.settings import DataSettings

    return load_texts(DataSettings(samples=3))


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


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_safetensors_names_the_file_and_the_fix(tmp_path, damage):
    directory = save(tiny_bert(), tmp_path / "check point")  # a space in the path, as users have
    weights = tmp_path / "check point" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x13" * 1000}[damage])
    with pytest.raises(UnknownModelError) as err:
        load_model(ModelSettings(name=directory))
    msg = str(err.value)
    assert str(weights) in msg and "SafetensorError" in msg and "Re-download or re-save" in msg
    assert "\n" not in msg  # one line: file, problem, fix


def test_corrupt_pytorch_bin_names_the_file(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    minilm_tokenizer().save_pretrained(tmp_path)
    assert load_model(ModelSettings(name=str(tmp_path))).vocab_size == 30522  # the intact .bin loads
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnknownModelError, match=r"pytorch_model\.bin cannot be read .*Re-download"):
        load_model(ModelSettings(name=str(tmp_path)))


def test_makefile_quotes_paths_with_spaces_and_quotes():
    """`make ... MODEL="/path/with space"` reaches the CLI as one argument (shell-quoted)."""
    import shlex
    import shutil
    import subprocess
    from pathlib import Path

    from compiler.cli import build_parser, settings_from_args

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parent.parent.parent
    model, calib = "/ckpt/my model", "/data/it's here/a b.tsv"
    for target in ("onnx", "export"):
        out = subprocess.run(["make", "-s", "-n", target, f"MODEL={model}", f"CALIB={calib}",
                              "TRAIN_TEXT=a.tsv b&c.txt", "VOCAB_TEXT=v(1).tsv"],
                             cwd=root, capture_output=True, text=True, check=True).stdout
        line = next(x for x in out.splitlines() if " -m compiler " in x)  # after any install-stamp lines
        argv = shlex.split(line)
        settings = settings_from_args(build_parser().parse_args(argv[argv.index("compiler") + 1:]))
        assert settings.model.name == model
        if target == "onnx":
            assert settings.data.path == calib
            assert settings.data.train_path == ("a.tsv", "b&c.txt")
            assert argv[argv.index("--prune-vocab") + 1] == "v(1).tsv"


def test_a_checkpoint_without_tokenizer_files_is_refused_not_run_on_unk_ids(tmp_path):
    # transformers builds a tokenizer of 5 special tokens from config.json + weights alone: every
    # word would be [UNK], and verify would "pass" on text the model never sees
    tiny_bert().save_pretrained(tmp_path / "bare")
    with pytest.raises(UnknownModelError, match=r"5 tokens for 30522 embedding rows.*vocab.txt"):
        load_model(ModelSettings(name=str(tmp_path / "bare")))
    loaded = load_model(ModelSettings(name=str(tmp_path / "bare"), weights="random"))  # structure work
    assert "stands in" in loaded.tokenizer_note and len(loaded.tokenizer) == 30522


def test_random_weights_refuse_a_stand_in_tokenizer_larger_than_the_table(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "small-vocab")
    with pytest.raises(UnknownModelError, match=r"30522 ids\) does not fit the model's 1000 embedding rows"):
        load_model(ModelSettings(name=str(tmp_path / "small-vocab"), weights="random"))


def test_an_encoder_decoder_checkpoint_is_refused_with_the_families_named(tmp_path):
    from transformers import T5Config, T5Model

    T5Model(T5Config(vocab_size=30522, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(
        tmp_path / "t5")
    minilm_tokenizer().save_pretrained(tmp_path / "t5")
    with pytest.raises(UnknownModelError, match=r"encoder-decoder \(seq2seq\) model \(t5\).*BERT-like encoders"):
        load_model(ModelSettings(name=str(tmp_path / "t5")))


def test_a_peft_adapter_folder_says_to_merge_it(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "bert"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UnknownModelError, match="holds a PEFT adapter .*merge_and_unload"):  # was "has no config.json"
        load_model(ModelSettings(name=str(tmp_path)))


def _tiny(config_class, **kw):
    import transformers

    torch.manual_seed(0)
    config = config_class(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, **kw)
    return transformers.AutoModel.from_config(config).eval()


@pytest.mark.parametrize("make, limit", [
    # fairseq-style position ids count from padding_idx + 1: 40 rows serve 40 - 1 - 1 tokens
    (lambda: _tiny(__import__("transformers").RobertaConfig, max_position_embeddings=40, pad_token_id=1), 38),
    (lambda: _tiny(__import__("transformers").MPNetConfig, max_position_embeddings=40, pad_token_id=1), 38),
    (lambda: _tiny(__import__("transformers").XLMRobertaConfig, max_position_embeddings=40, pad_token_id=0), 39),
    (lambda: _tiny(__import__("transformers").BertConfig, max_position_embeddings=40), 40),
    # OPT adds its offset of 2 to the table instead: 40 positions serve 40 tokens
    (lambda: __import__("transformers").OPTModel(__import__("transformers").OPTConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
        max_position_embeddings=40, word_embed_proj_dim=16)).eval(), 40),
])
def test_max_positions_is_the_longest_sequence_the_model_runs(make, limit):
    from compiler.training.models import max_positions

    model = make()
    assert max_positions(model.config, model) == limit
    ids = torch.full((1, limit), 5, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))  # the limit runs
        with pytest.raises((IndexError, RuntimeError)):  # one more token is out of the table
            longer = torch.full((1, limit + 1), 5, dtype=torch.long)
            model(input_ids=longer, attention_mask=torch.ones_like(longer))


def test_defaults_the_user_did_not_give_fit_a_small_models_positions(tmp_path):
    from compiler.cli import build_parser, settings_from_args
    from compiler.training.models import fit_to_positions

    # 66 rows from padding index 1 serve 64 tokens (read from the model built on the meta device)
    model = _tiny(__import__("transformers").RobertaConfig, max_position_embeddings=66, pad_token_id=1)
    path = save(model, tmp_path / "roberta-64")

    def fitted(*argv):
        args = build_parser().parse_args(["compile", "--model", path, *argv])
        s = fit_to_positions(settings_from_args(args), set(vars(args)))
        p = s.engine.profiles[0]
        return p.opt_shape, p.max_shape, s.data.max_length

    assert fitted() == ((1, 64), (32, 64), 64)  # defaults 1x128 / 32x512 / 128 cut to the 64 positions
    assert fitted("--max-shape", "8x100", "--max-length", "100") == ((1, 100), (8, 100), 100)  # given: kept
    assert fitted("--max-length", "32") == ((1, 64), (32, 64), 32)
    args = build_parser().parse_args(["compile", "--model", path, "--max-past", "1000"])
    assert fit_to_positions(settings_from_args(args), set(vars(args))).engine.profiles[0].max_past == 1000  # kept,
    # so check_shapes refuses it (it was dropped for the default, and the decode profile quietly shrank)
    bert = settings_from_args(build_parser().parse_args(["compile", "--model", save(tiny_bert(), tmp_path / "b")]))
    assert fit_to_positions(bert, {"model"}) == bert  # 512 positions: the defaults fit, nothing changes
    # a RoBERTa-style table of 512 rows from padding index 1 serves 510 tokens, not the default 512
    model = _tiny(__import__("transformers").RobertaConfig, max_position_embeddings=512, pad_token_id=1)
    path = save(model, tmp_path / "roberta-510")
    assert fitted() == ((1, 128), (32, 510), 128)
    roberta_base_like = _tiny(__import__("transformers").RobertaConfig, max_position_embeddings=514, pad_token_id=1)
    s = settings_from_args(build_parser().parse_args(["compile", "--model", save(roberta_base_like, tmp_path / "r")]))
    assert fit_to_positions(s, {"model"}) == s  # 514 rows from padding index 1: 512 tokens, the defaults fit


def test_load_tokenizer_without_weights_refuses_a_lost_vocabulary_too(tmp_path):
    from compiler.training.models import load_tokenizer

    assert len(load_tokenizer(ModelSettings(name=save(tiny_bert(), tmp_path / "bert")))) == 30522
    tiny_bert().save_pretrained(tmp_path / "bare")  # config.json and weights, no tokenizer files
    with pytest.raises(UnknownModelError, match="5 tokens for 30522 embedding rows"):
        load_tokenizer(ModelSettings(name=str(tmp_path / "bare")))


@pytest.mark.parametrize("config, family", [
    ("BertConfig", "encoder"), ("RobertaConfig", "encoder"), ("ElectraConfig", "encoder"),  # also causal-LM classes
    ("DebertaV2Config", "encoder"), ("GPT2Config", "decoder"),
    ("FalconConfig", "decoder"), ("GemmaConfig", "decoder"), ("CodeGenConfig", "decoder"),  # in no hand-kept list
])
def test_the_family_follows_transformers_causal_and_masked_lm_classes(config, family):
    import transformers

    from compiler.training.models import _family

    assert _family(getattr(transformers, config)()) == family


def test_a_multi_query_decoder_exports_its_one_kv_head(tmp_path, texts):
    """Falcon's config says `multi_query`, not `num_key_value_heads`: the cache's geometry is
    measured from the model (one KV head of 16), and the KV-cache export passes parity."""
    import transformers

    from compiler.settings import ExportSettings
    from compiler.training.export import onnx_from_torch

    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    assert config.multi_query and getattr(config, "num_key_value_heads", None) in (None, 4)  # the config does not say 1
    directory = save(transformers.FalconForCausalLM(config), tmp_path / "falcon")
    loaded = load_model(ModelSettings(name=directory, task="text-generation-with-past"))
    assert loaded.family == "decoder"
    assert (loaded.cache.layers, loaded.cache.heads, loaded.cache.head_dim) == (2, 1, 16)
    _, report = onnx_from_torch(loaded, ExportSettings(parity_sequences=(8, 33)), tmp_path / "falcon.onnx", texts)
    assert any("decode" in p.output for p in report.parity)
    assert max(p.max_abs_diff for p in report.parity) < 1e-4


def test_a_bfloat16_checkpoint_loads_and_fp32_keys_keep_their_bytes(tmp_path):
    """NumPy has no bfloat16: the weights digest reads raw bytes, and for FP32 weights those are
    the bytes it always hashed (`tensor.numpy().tobytes()`), so earlier caches keep their keys."""
    import hashlib

    from compiler.training.models import _weights_digest

    model = tiny_bert()
    old = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        old.update(name.encode())
        old.update(str(tuple(tensor.shape)).encode())
        old.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    assert _weights_digest(model) == old.hexdigest()
    loaded = load_model(ModelSettings(name=save(tiny_bert().to(torch.bfloat16), tmp_path / "bf16")))
    assert next(loaded.module.parameters()).dtype == torch.float32  # compiled from FP32 weights
    assert load_model(ModelSettings(name=str(tmp_path / "bf16"))).key == loaded.key


def test_a_checkpoint_with_its_own_code_names_the_flag_and_runs_with_it(tmp_path):
    import json

    directory = tmp_path / "custom"
    save(tiny_bert(), directory)
    (directory / "modeling_custom.py").write_text(
        "from transformers import BertConfig, BertModel\n"
        "class CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n")
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="custom-bert", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "modeling_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"})
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownModelError, match=r"pass --trust-remote-code \(Makefile: ARGS=--trust-remote-code\)"):
        load_model(ModelSettings(name=str(directory)))
    loaded = load_model(ModelSettings(name=str(directory), trust_remote_code=True))
    assert type(loaded.module).__name__ == "CustomModel" and loaded.family == "encoder"


def test_a_decoder_without_a_kv_cache_is_refused_for_with_past_naming_text_generation():
    import transformers

    from compiler.errors import CompilerError
    from compiler.training.models import _family
    from compiler.training.tasks import cache_spec

    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8)
    assert _family(config) == "decoder"  # a causal LM: its natural task is with-past
    torch.manual_seed(0)
    with pytest.raises(CompilerError, match=r"keeps no such cache .* Use --task text-generation"):
        cache_spec(config, transformers.MambaForCausalLM(config).eval())


def test_a_decoder_classifier_without_a_pad_token_id_reads_the_pipelines_pad(tmp_path):
    """GPT2ForSequenceClassification pools the last non-pad token and cannot batch without
    `pad_token_id` (was exit 3 in the export: "Cannot handle batch sizes > 1")."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=30522, n_positions=64, num_labels=3)
    assert config.pad_token_id is None
    loaded = load_model(ModelSettings(name=save(GPT2ForSequenceClassification(config), tmp_path / "cls"),
                                      task="text-classification"))
    assert loaded.module.config.pad_token_id == loaded.tokenizer.pad_token_id == 0  # MiniLM's [PAD]
    assert loaded.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    ids = torch.tensor([[101, 2023, 102, 0], [101, 2023, 2003, 102]])
    with torch.no_grad():
        out = loaded.module(input_ids=ids, attention_mask=(ids != 0).long()).logits
        alone = loaded.module(input_ids=ids[:1, :3]).logits
    torch.testing.assert_close(out[:1], alone, rtol=1e-4, atol=1e-5)  # the padded row reads its last real token


def test_a_model_without_a_token_embedding_table_is_refused(tmp_path):
    from transformers import CanineConfig, CanineModel

    path = save(CanineModel(CanineConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64)), tmp_path / "canine")
    with pytest.raises(UnknownModelError, match="CanineModel has no token embedding table"):  # was exit 3
        load_model(ModelSettings(name=path))


def test_hub_ids_of_the_registered_models_resolve_offline(tmp_path, monkeypatch):
    """MiniLM's hub id was a hub lookup (exit 1 offline) though its weights ship in a package."""
    from compiler.training import models

    loaded = load_model(ModelSettings(name="sentence-transformers/all-MiniLM-L6-v2"))
    assert loaded.source == load_model(ModelSettings(name="minilm")).source  # the same weights: the package's
    assert models._locate("bert-base-uncased")[0] is models.REGISTRY["bert-base"]  # --weights random: no hub
    assert models._locate("OPENAI-COMMUNITY/GPT2")[0] is models.REGISTRY["gpt2"]
    save(tiny_bert(), tmp_path / "bert-base-uncased")  # a local folder of that name stays a local checkpoint
    monkeypatch.chdir(tmp_path)
    assert models._locate("bert-base-uncased")[:2] == (None, "bert-base-uncased")


def test_a_checkpoint_with_tensorflow_weights_only_says_to_convert_them(tmp_path):
    directory = tmp_path / "tf-only"
    save(tiny_bert(), directory)
    for f in directory.glob("*.safetensors"):
        f.unlink()
    (directory / "tf_model.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(UnknownModelError, match=r"holds tf_model.h5 only: .*from_tf=True.*save_pretrained"):
        load_model(ModelSettings(name=str(directory)))
