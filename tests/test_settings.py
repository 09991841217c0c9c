"""compiler/settings/: every section refuses bad values with the reason, and the cache keys."""

from __future__ import annotations

import pytest

from compiler.settings import (BuildSettings, DataSettings, ModelSettings, PrecisionSettings, ProfileSettings, QuantSettings,
                               SparsitySettings, TrainSettings, settings_hash)


def test_quant_settings_validate():
    QuantSettings()
    for bad in (dict(method="mse"), dict(percentile=0.0), dict(percentile=100.5), dict(num_bins=128),
                dict(exclude=["*"]), dict(exclude=("",)), dict(min_cosine=1.5), dict(max_excluded=-1),
                dict(smoothquant_alpha=1.2), dict(calib_windows=0), dict(sensitivity_samples=0)):
        with pytest.raises(ValueError):
            QuantSettings(**bad)


@pytest.mark.parametrize("make, match", [
    (lambda: PrecisionSettings(mode="int4"), "precision='int4'"),
    (lambda: ProfileSettings(min_shape=(4, 1), opt_shape=(1, 128)), r"min \(4\) <= opt \(1\)"),
    (lambda: SparsitySettings(pattern="1:4"), "sparsity='1:4'"),
    (lambda: SparsitySettings(recover_steps=-1), "recover_steps=-1"),
    (lambda: SparsitySettings(recover_steps="600"), "recover_steps='600'"),
    (lambda: TrainSettings(device="tpu"), "device='tpu'"),
    (lambda: DataSettings(train_path=("a", "b"), train_samples=1), "2 training texts"),
    (lambda: ModelSettings(seed=-1), "seed=-1"),  # was exit 3 in NumPy's SeedSequence
    (lambda: TrainSettings(seed=2**32), "seed=4294967296"),
])
def test_bad_values_name_the_problem(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cache_dir_lies_beside_the_artifacts_and_stays_out_of_keys():
    assert BuildSettings().data.cache_dir == "engines/cache"
    assert BuildSettings(output_dir="/srv/out").data.cache_dir == "/srv/out/cache"
    assert BuildSettings(data=DataSettings(cache_dir="c")).data.cache_dir == "c"
    # where a cache lies does not change what it holds: the same key
    assert settings_hash(DataSettings(cache_dir="a")) == settings_hash(DataSettings(cache_dir="b"))
    assert settings_hash(DataSettings(samples=8)) != settings_hash(DataSettings(samples=9))


def test_settings_hash_fields_marked_if_set_or_off():
    # `device` says where training runs, not what it computes: out of the key
    assert settings_hash(TrainSettings(device="cuda")) == settings_hash(TrainSettings())
    # `bf16` counts only when set, so keys made before it existed stay valid
    assert settings_hash(TrainSettings(bf16=False)) == settings_hash(TrainSettings())
    assert settings_hash(TrainSettings(bf16=True)) != settings_hash(TrainSettings())
    # canonical: dict order does not matter
    assert settings_hash({"a": 1, "b": 2}) == settings_hash({"b": 2, "a": 1})


def test_artifact_folders():
    s = BuildSettings(precision=PrecisionSettings(mode="fp16"), sparsity=SparsitySettings(pattern="2:4"))
    assert str(s.model_dir()) == "engines/minilm/pretrained"
    assert str(s.variant_dir()) == "engines/minilm/pretrained/sparse24/fp16"


def test_options_given_where_no_stage_reads_them_are_named():
    from compiler.settings import ModelSettings
    from compiler.settings.effect import options_without_effect

    hybrid = BuildSettings(precision=PrecisionSettings(mode="hybrid"))
    lines = options_without_effect({"exclude", "recover_steps", "train_steps", "samples"}, hybrid)
    assert lines == ["--exclude: no effect here (only with --precision int8 or int8-qat)",
                     "--train-steps: no effect here (only with --precision int8-qat)",
                     "--recover-steps: no effect here (only with --sparsity 2:4)"]  # were ignored without a word
    qat = BuildSettings(precision=PrecisionSettings(mode="int8-qat"), sparsity=SparsitySettings(pattern="2:4"))
    assert options_without_effect({"exclude", "recover_steps", "train_steps", "train_text"}, qat) == []
    decoder = BuildSettings(model=ModelSettings(task="feature-extraction"))
    assert options_without_effect({"max_past"}, decoder) == [
        "--max-past: no effect here (only with --task text-generation-with-past)"]
