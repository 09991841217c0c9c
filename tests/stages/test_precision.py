"""compiler/stages/precision.py: a variant is reused only when the graph, the settings and the
pass's own code are the ones that made it."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
from onnx import helper

from compiler.graph.onnx_io import save_onnx
from compiler.settings import BuildSettings, PrecisionSettings
from compiler.stages import precision as stage
from tests.models import f32, make_model


def test_a_variant_made_by_other_pass_code_is_made_again(tmp_path, monkeypatch, caplog):
    """A rule added to the pass (the RMS norm's, the position angles') left the variants of the
    code before it in place: the next run reused them, content key unchanged."""
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], name="s"),
                        helper.make_node("Mul", ["y", "k"], ["z"], name="m")],
                       [f32("x", ["b", 4])], [f32("z", ["b", 4])], {"k": np.array(2.0, np.float32)})
    source = save_onnx(model, tmp_path / "m.onnx")
    settings = BuildSettings(output_dir=str(tmp_path / "out"), precision=PrecisionSettings(mode="hybrid"))
    export = SimpleNamespace(loaded=SimpleNamespace(cache=None))

    def reused() -> bool:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="compiler.artifacts"):
            stage.stage_precision(settings, export, source, False, None)
        return "precision: reused" in caplog.text

    assert not reused() and reused()  # made, then reused: the same graph, settings and code
    assert len(stage.pass_digest()) == 16
    monkeypatch.setattr(stage, "pass_digest", lambda: "another-pass-code")
    assert not reused()  # the same graph and settings, other rules: made again
