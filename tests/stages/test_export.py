"""compiler/stages/export.py: shapes checked against the model's position limit before any work."""

from __future__ import annotations

import pytest

from compiler.errors import CompilerError
from compiler.settings import BuildSettings, EngineSettings, ProfileSettings
from compiler.stages.export import check_shapes


def _settings(**profile) -> BuildSettings:
    return BuildSettings(engine=EngineSettings(profiles=(ProfileSettings.fitted(**profile),)))


def test_a_kv_cache_past_must_leave_room_for_the_decode_step():
    # GPT-2: 1024 positions; a decode step at past 1023 holds 1024, at 1024 one too many
    check_shapes(_settings(max_shape=(1, 1024), max_past=1023), 1024, cache=True)
    with pytest.raises(CompilerError, match=r"--max-past 1024: .* 1025 positions > 1024; use --max-past 1023"):
        check_shapes(_settings(max_shape=(1, 128), max_past=1024), 1024, cache=True)
    check_shapes(_settings(max_shape=(1, 128), max_past=1024), 1024)  # no cache: the past is ignored


def test_profile_shapes_past_the_limit_name_the_flag_and_the_value_that_fits():
    with pytest.raises(CompilerError, match=r"--max-shape 4x600: sequence 600 > 512; use --max-shape 4x512"):
        check_shapes(_settings(max_shape=(4, 600)), 512)
    check_shapes(_settings(max_shape=(4, 512)), 512)
    check_shapes(_settings(max_shape=(4, 600)), None)  # no limit named by the config
