"""`run --generate N` and `Bundle.generate` (compiler/deploy/generation.py): greedy tokens on a tiny
GPT-2 `text-generation-with-past` bundle equal PyTorch's `generate(do_sample=False)`, with and
without the KV cache; runs beyond the profiles are refused before the first step; a bundle of
another task is refused by name.

The bundle (FP32, so that ONNX Runtime and PyTorch pick the same argmax) has the profile 1x1 /
1x8 / 2x32: context sequence <= 32, decode past <= 31, batch <= 2."""

from __future__ import annotations

import contextlib
import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest

from compiler.cli import main
from compiler.deploy.runtime import Bundle
from compiler.errors import CompilerError, DeploymentRefusedError
from tests.models import TINY_HIDDEN, TINY_LAYERS, minilm_tokenizer

MAX = (2, 32)
PROMPTS = ["The tower is tall and", "A small cat sat on the", "Rain fell on the old stone bridge"]


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gen-tiny-gpt2")
    torch.manual_seed(0)  # n_positions above the export's parity shapes (128 + a decode step)
    GPT2LMHeadModel(GPT2Config(n_embd=TINY_HIDDEN, n_layer=TINY_LAYERS, n_head=2, vocab_size=30522, n_positions=256,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gen_bundle(gpt2_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen-engines")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["-q", "bundle", "--model", str(gpt2_checkpoint), "--task", "text-generation-with-past",
                     "--precision", "fp32", "--samples", "2", "--calib-samples", "2", "--max-length", "16",
                     "--output-dir", str(out), "--min-shape", "1x1", "--opt-shape", "1x8",
                     "--max-shape", f"{MAX[0]}x{MAX[1]}"])
    assert code == 0, printed.getvalue()
    (bundle,) = out.rglob("bundle")
    return bundle


@pytest.fixture(scope="module")
def loaded(gen_bundle) -> Bundle:
    return Bundle.load(gen_bundle, backend="onnxruntime")


@functools.lru_cache(maxsize=1)
def _torch_model(checkpoint: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(checkpoint).eval()


def torch_greedy(checkpoint: Path, ids: list[int], n: int) -> list[int]:
    """PyTorch FP32 `generate(do_sample=False)`: exactly n new tokens (min_new_tokens = n)."""
    import torch

    model = _torch_model(checkpoint)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_the_bundle_has_a_context_and_a_decode_profile_that_survive_a_rebuild(loaded, gen_bundle):
    from compiler.deploy.bundle import bundle_engine_settings, bundle_profiles
    from compiler.settings import EngineSettings, ProfileSettings

    m = loaded.manifest
    assert m["model"]["task"] == "text-generation-with-past"
    context, decode = m["profiles"]
    assert context["past_key_values.0.key"]["max"][2] == 0 and context["input_ids"]["max"] == list(MAX)
    assert decode["input_ids"]["max"] == [MAX[0], 1] and decode["past_key_values.0.key"]["max"][2] == MAX[1] - 1
    assert decode["attention_mask"]["max"] == list(MAX)
    source = gen_bundle / m["build_source"]["file"]
    # what `build --bundle` recomputes on the GPU host: the same two profiles (the past kept)
    assert bundle_profiles(source, bundle_engine_settings(m).profiles) == m["profiles"]
    eng = bundle_engine_settings(m, EngineSettings(profiles=(ProfileSettings((1, 1), (1, 8), (2, 64)),)))
    assert [(p.max_shape, p.min_past, p.max_past) for p in eng.profiles] == [((2, 64), 0, 0), ((2, 1), 1, 63)]
    config = (gen_bundle / m["name"] / "config.pbtxt").read_text()
    assert 'name: "past_key_values.0.key"' in config and 'profile: "1"' in config


@pytest.mark.parametrize("use_cache", [True, False])
def test_api_tokens_equal_pytorch_generate(loaded, gpt2_checkpoint, use_cache):
    n = 6
    result = loaded.generate(PROMPTS, n, use_cache=use_cache)
    assert result.cached is use_cache and result.backend == "onnxruntime"
    assert len(result.batches) == 3  # three token counts: one batch each, no padding
    for prompt, ids, tokens, text in zip(PROMPTS, result.prompts, result.tokens, result.texts):
        assert ids == loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert tokens == torch_greedy(gpt2_checkpoint, ids, n)
        assert text == loaded.tokenizer.decode(tokens)
    same = loaded.generate(np.array([result.prompts[0]] * 3), n, use_cache=use_cache)  # ids in, batch of 3
    assert same.tokens == [result.tokens[0]] * 3 and len(same.batches) == 2  # cut at the profile's batch 2


def test_cli_generate_with_and_without_cache(gen_bundle, gpt2_checkpoint, loaded, tmp_path, capsys):
    expected = None
    for flags in ([], ["--no-cache"]):
        code = main(["run", str(gen_bundle), "--generate", "5", "--prompt", PROMPTS[0], "--backend", "onnxruntime",
                     "--out", str(tmp_path), *flags])
        printed = capsys.readouterr().out
        assert code == 0, printed
        result = json.loads((tmp_path / "generate.json").read_text())
        assert result["cached"] is (not flags) and result["backend"] == "onnxruntime"
        expected = expected or torch_greedy(gpt2_checkpoint, result["prompt_ids"][0], 5)
        assert result["tokens"] == [expected]
        assert "tokens/s" in printed and repr(result["texts"][0]) in printed
    # a plain run of the same bundle is the context pass: the cache inputs get an empty past
    assert main(["run", str(gen_bundle), "--text", PROMPTS[0], "--backend", "onnxruntime", "--out", str(tmp_path)]) == 0
    logits, ids = np.load(tmp_path / "logits.npy"), loaded.tokenize([PROMPTS[0]])["input_ids"]  # with [CLS] .. [SEP]
    assert int(logits[0, -1].argmax()) == loaded.generate(ids, 1).tokens[0][0]
    assert np.load(tmp_path / "present.0.key.npy").shape[2] == logits.shape[1] == ids.shape[1]


def test_too_long_a_run_is_refused_before_running_with_what_fits(loaded, gen_bundle, capsys):
    ids = np.arange(1000, 1004, dtype=np.int64)[None]  # 4 prompt tokens: 4 + 29 - 1 = 32 positions fit
    for use_cache in (True, False):
        assert len(loaded.generate(ids, 29, use_cache=use_cache).tokens[0]) == 29
        with pytest.raises(DeploymentRefusedError) as e:
            loaded.generate(ids, 30, use_cache=use_cache)
        assert e.value.check == "generation length" and "at most 29 new tokens fit" in e.value.fix
    with pytest.raises(DeploymentRefusedError, match="the prompt alone does not fit"):
        loaded.generate(np.ones((1, MAX[1] + 1), np.int64), 1)
    assert main(["run", str(gen_bundle), "--generate", "100", "--prompt", "hello", "--backend", "onnxruntime"]) == 4
    assert "refused (generation length)" in capsys.readouterr().err


def test_bad_requests_exit_1(loaded, gen_bundle, tiny_bundle, capsys):
    assert main(["run", str(tiny_bundle[0]), "--generate", "4", "--prompt", "hello"]) == 1  # a BERT bundle
    err = capsys.readouterr().err
    assert "task feature-extraction" in err and "--task text-generation-with-past" in err
    assert main(["run", str(gen_bundle), "--prompt", "hello"]) == 1  # --prompt without --generate
    assert "--prompt goes with --generate" in capsys.readouterr().err
    assert main(["run", str(gen_bundle), "--generate", "4", "--prompt", "hi", "--check"]) == 1
    with pytest.raises(CompilerError, match="at least 1 new token"):
        loaded.generate(["hello"], 0)
    with pytest.raises(CompilerError, match="no tokens"):
        loaded.generate([""], 2)


@pytest.mark.gpu
def test_tensorrt_generation_equals_onnxruntime(gen_bundle, loaded, tmp_path):
    import shutil

    from compiler.deploy.bundle import build_here_problem, build_into_bundle

    problem = build_here_problem()
    if problem:
        pytest.skip(f"needs TensorRT 11 and a GPU: {problem}")
    copy = Path(shutil.copytree(gen_bundle, tmp_path / "bundle"))
    manifest = build_into_bundle(copy)
    assert manifest["profiles"] == loaded.manifest["profiles"]  # the decode profile's past survived the build
    engine = Bundle.load(copy, backend="tensorrt")
    for use_cache in (True, False):
        assert engine.generate(PROMPTS, 6, use_cache).tokens == loaded.generate(PROMPTS, 6, use_cache).tokens


def test_generate_subcommand_takes_the_tokenizer_of_the_bundle_its_onnx_lies_in(gen_bundle, tiny_bundle, capsys):
    manifest = json.loads((gen_bundle / "manifest.json").read_text())
    onnx_file = gen_bundle / manifest["onnxruntime"]["file"]
    # no --model: was gpt2's tokenizer from the hub (exit 1 offline, the wrong vocabulary online)
    assert main(["generate", "--onnx", str(onnx_file), "--prompt", "The tower is", "-n", "3"]) == 0
    assert "with KV cache: 3 tokens" in capsys.readouterr().out
    encoder = tiny_bundle[0] / json.loads((tiny_bundle[0] / "manifest.json").read_text())["onnxruntime"]["file"]
    assert main(["generate", "--onnx", str(encoder), "--prompt", "hi"]) == 1
    assert "not a text-generation graph (no 'logits' output" in capsys.readouterr().err
