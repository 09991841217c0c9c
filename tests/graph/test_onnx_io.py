"""compiler/graph/onnx_io.py: loading, atomic saving with external data, light copies, sessions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import InvalidOnnxError
from compiler.graph.onnx_io import (constants_to_initializers, graph_copy, load_onnx, onnx_sha256, ort_session,
                                    proto_nbytes, save_onnx, session_with_outputs, without_weights)
from tests.models import f32, make_model

W = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 100  # 8 KiB: goes to external data
B = np.array([1.0, -2.0], np.float32)  # 8 bytes: below the 1 KiB threshold, stays inline


def linear():
    """X (batch, 64) -> MatMul W (64, 32) -> h -> Slice first two columns -> Add B -> Y (batch, 2)."""
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
             helper.make_node("Slice", ["h", "starts", "ends", "axes"], ["h2"], name="slice"),
             helper.make_node("Add", ["h2", "B"], ["Y"], name="add")]
    inits = {"W": W, "B": B, "starts": np.array([0], np.int64), "ends": np.array([2], np.int64),
             "axes": np.array([1], np.int64)}
    return make_model(nodes, [f32("X", ["batch", 64])], [f32("Y", ["batch", 2])], inits)


X = np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(3, 64)
Y = (X @ W)[:, :2] + B  # the reference, in NumPy


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("external", [True, False])
def test_save_load_round_trip(tmp_path, external):
    path = save_onnx(linear(), tmp_path / "m.onnx", external=external)
    data = tmp_path / "m.onnx.data"
    assert path == tmp_path / "m.onnx" and data.is_file() == external
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"][: 1 + external]  # no temp left
    loaded = load_onnx(path)
    got = weights(loaded)
    np.testing.assert_array_equal(got["W"], W)
    np.testing.assert_array_equal(got["B"], B)
    assert [n.name for n in loaded.graph.node] == ["mm", "slice", "add"]
    (y,) = ort_session(path).run(None, {"X": X})
    np.testing.assert_allclose(y, Y, rtol=1e-6)
    if external:  # the big weight lies in the data file, the small one inline
        light = onnx.load(str(path), load_external_data=False)
        where = {t.name: t.data_location for t in light.graph.initializer}
        assert where["W"] == TensorProto.EXTERNAL and where["B"] == TensorProto.DEFAULT
        assert data.stat().st_size == W.nbytes


def test_resave_inline_removes_stale_data_and_hash_follows_data(tmp_path):
    path = save_onnx(linear(), tmp_path / "m.onnx", external=True)
    external_hash = onnx_sha256(path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")  # the graph file is unchanged
    assert onnx_sha256(path) != external_hash
    save_onnx(linear(), path, external=False)
    assert not data.exists()  # a stale data file would be read by nothing and mislead
    np.testing.assert_array_equal(weights(load_onnx(path))["W"], W)


def test_onnx_sha256_remembers_an_unchanged_file_and_sees_a_rewrite(tmp_path, monkeypatch):
    """One read per unchanged file and process (the stages hash the same 1.3 GB graph); an
    in-place rewrite of the same size is seen, and a file modified just now is read again
    each time (git's "racy clean": its stat may not change on the next rewrite)."""
    import os
    import time
    from pathlib import Path

    from compiler import artifacts

    path = save_onnx(linear(), tmp_path / "m.onnx", external=True)
    data = tmp_path / "m.onnx.data"
    past = time.time() - 60
    for f in (path, data):
        os.utime(f, (past, past))
    reads, real = [], artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: reads.append(Path(p).name) or real(p, *a))
    first = onnx_sha256(path)
    assert onnx_sha256(path) == first and reads == ["m.onnx", "m.onnx.data"]
    data.write_bytes(data.read_bytes()[:-4] + b"\1\1\1\1")  # same size, same inode
    changed = onnx_sha256(path)
    assert changed != first and len(reads) == 4
    assert onnx_sha256(path) == changed and len(reads) == 6  # modified just now: not remembered


def test_invalid_files_raise_invalid_onnx_error(tmp_path):
    with pytest.raises(InvalidOnnxError, match="no such ONNX file"):
        load_onnx(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe not a protobuf \x00" * 10)
    with pytest.raises(InvalidOnnxError, match="not a readable ONNX model"):
        load_onnx(garbage)
    path = save_onnx(linear(), tmp_path / "m.onnx", external=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(InvalidOnnxError, match="not a readable ONNX model"):
        load_onnx(path)
    broken = linear()
    broken.graph.node[2].input[0] = "nowhere"  # reads a tensor no node produces
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    with pytest.raises(InvalidOnnxError, match="fails onnx.checker"):
        load_onnx(tmp_path / "broken.onnx")
    assert load_onnx(tmp_path / "broken.onnx", check=False).graph.node[2].input[0] == "nowhere"


def test_light_copies_keep_the_graph_not_the_weights():
    model = linear()
    copy = graph_copy(model)
    assert len(copy.graph.initializer) == 0 and copy.graph.node == model.graph.node
    light = without_weights(model)
    assert sorted(t.name for t in light.graph.initializer) == ["B", "axes", "ends", "starts"]
    big = [i for i in light.graph.input if i.name == "W"]
    assert len(big) == 1 and [d.dim_value for d in big[0].type.tensor_type.shape.dim] == [64, 32]
    assert len(model.graph.initializer) == 5  # the original keeps its weights


def test_constants_to_initializers():
    nodes = [helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(np.float32(2.0))),
             helper.make_node("Constant", [], ["b"], value_floats=[1.0, 3.0]),
             helper.make_node("Constant", [], ["c"], value_ints=[4, 5]),
             helper.make_node("Constant", [], ["s"], value_string="kept"),
             helper.make_node("Mul", ["X", "a"], ["m"]), helper.make_node("Add", ["m", "b"], ["Y"])]
    model = make_model(nodes, [f32("X", [2])], [f32("Y", [2])])
    constants_to_initializers(model)
    assert [n.op_type for n in model.graph.node] == ["Constant", "Mul", "Add"]  # the string stays a node
    got = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert got["a"] == np.float32(2.0) and got["a"].dtype == np.float32
    np.testing.assert_array_equal(got["b"], np.array([1.0, 3.0], np.float32))
    assert got["c"].dtype == np.int64 and got["c"].tolist() == [4, 5]
    (y,) = ort_session(model).run(None, {"X": np.array([1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(y, [3.0, 7.0])  # 2x + [1, 3]


def test_session_with_outputs_reads_external_weights(tmp_path):
    path = save_onnx(linear(), tmp_path / "m.onnx", external=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    sess = session_with_outputs(path, ["h"])
    h, y = sess.run(["h", "Y"], {"X": X})
    np.testing.assert_allclose(h, X @ W, rtol=1e-5)
    np.testing.assert_allclose(y, Y, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # its light graph copy is gone


def test_check_onnx_file_reads_the_graph_not_the_weights(tmp_path):
    import numpy as np
    from onnx import helper

    from compiler.errors import InvalidOnnxError
    from compiler.graph.onnx_io import check_onnx_file, save_onnx
    from tests.models import f32, make_model

    model = make_model([helper.make_node("Add", ["X", "w"], ["Y"])], [f32("X", [512])], [f32("Y", [512])],
                       {"w": np.ones(512, np.float32)})
    path = save_onnx(model, tmp_path / "m.onnx", external=True)
    check_onnx_file(path)  # fine
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(InvalidOnnxError, match="external weights"):
        check_onnx_file(path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(InvalidOnnxError, match="holds no ONNX graph"):
        check_onnx_file(tmp_path / "empty.onnx")
    with pytest.raises(InvalidOnnxError, match="no such ONNX file"):
        check_onnx_file(tmp_path / "missing.onnx")


def test_save_removes_temp_folders_left_by_killed_saves(tmp_path):
    import os
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid whose process has ended: as after kill -9 during a save
    stale = tmp_path / f".m.onnx.{gone.pid}.k3j_x9q2"
    stale.mkdir()
    (stale / "m.onnx.data").write_bytes(b"\0" * 4096)
    live = tmp_path / f".m.onnx.{os.getppid()}.a1b2c3d4"  # a live process's save in progress: kept
    live.mkdir()
    path = save_onnx(linear(), tmp_path / "m.onnx", external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", "m.onnx.data", live.name])
    np.testing.assert_array_equal(weights(load_onnx(path))["W"], W)


def test_save_on_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    import errno

    from compiler.errors import CompilerError

    path = save_onnx(linear(), tmp_path / "m.onnx", external=False)
    before = path.read_bytes()

    def full(model, f, **kw):
        with open(f, "wb") as out:
            out.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", f)

    monkeypatch.setattr(onnx, "save_model", full)
    model = linear()
    with pytest.raises(CompilerError) as e:
        save_onnx(model, path, external=True)
    msg = str(e.value)
    assert msg.startswith(f"{path}: no space left on the device") and "\n" not in msg
    assert f"{proto_nbytes(model) / 1024:.1f} KiB to write" in msg and "--output-dir" in msg
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_session_with_outputs_leaves_no_temporary_and_removes_a_killed_runs(tmp_path):
    import numpy as np
    from onnx import helper

    from compiler.graph.onnx_io import save_onnx, session_with_outputs
    from tests.models import f32, make_model

    model = make_model([helper.make_node("Relu", ["X"], ["h"]), helper.make_node("Neg", ["h"], ["Y"])],
                       [f32("X", [2])], [f32("Y", [2])])
    path = save_onnx(model, tmp_path / "m.onnx")
    stale = tmp_path / ".m.onnx.outputs.999999999.abc.tmp"  # a pid no process has
    stale.write_bytes(b"left by kill -9")
    sess = session_with_outputs(path, ["h"])
    h, y = sess.run(["h", "Y"], {"X": np.array([-1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(h, [0.0, 2.0])
    np.testing.assert_array_equal(y, [-0.0, -2.0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_saved_onnx_and_its_weights_follow_the_umask(tmp_path):
    """A bundle copied to a server must be readable by the service user (0644 under umask 022)."""
    import os
    import stat

    import numpy as np
    from onnx import helper

    from compiler.graph.onnx_io import save_onnx
    from tests.models import f32, make_model

    model = make_model([helper.make_node("Add", ["X", "w"], ["Y"])], [f32("X", [512])], [f32("Y", [512])],
                       {"w": np.ones(512, np.float32)})
    old = os.umask(0o022)
    try:
        path = save_onnx(model, tmp_path / "m.onnx", external=True)
    finally:
        os.umask(old)
    for p in (path, tmp_path / "m.onnx.data"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_proto_nbytes_bounds_the_serialized_size_without_encoding_the_weights():
    """proto_nbytes never under-states the size (save and session decide external data on it),
    and overstates it by at most 32 bytes per initializer and a fixed 64 + 8 per string field."""
    model = linear()
    big = np.random.default_rng(0).standard_normal((128, 160)).astype(np.float32)  # 80 KiB: header + bytes path
    model.graph.initializer.append(numpy_helper.from_array(big, "big"))
    model.doc_string, model.producer_version, model.graph.doc_string = "a model", "1.2.3", "graph doc é"
    onnx.helper.set_model_props(model, {"key": "value"})
    exact = model.ByteSize()
    slack = 32 * len(model.graph.initializer) + 64 + 8 * 5
    assert exact <= proto_nbytes(model) <= exact + slack
    light = linear()
    assert light.ByteSize() <= proto_nbytes(light) <= light.ByteSize() + 32 * len(light.graph.initializer) + 96


def test_model_digest_follows_the_computation_not_the_file(tmp_path):
    """Equal for a copy and for the model saved and loaded back (inline or with external data),
    different when a weight or a node changes; None for a proto whose weights stay in a file."""
    from compiler.graph.onnx_io import model_digest

    digest = model_digest(linear())
    assert digest == model_digest(linear())
    for external in (False, True):
        save_onnx(linear(), tmp_path / f"m{external}.onnx", external=external)
        assert model_digest(load_onnx(tmp_path / f"m{external}.onnx")) == digest
    assert model_digest(onnx.load(str(tmp_path / "mTrue.onnx"), load_external_data=False)) is None
    changed = linear()
    changed.graph.initializer[0].raw_data = (numpy_helper.to_array(changed.graph.initializer[0]) + 1).tobytes()
    assert model_digest(changed) != digest
    renamed = linear()
    renamed.graph.node[2].op_type = "Sub"
    assert model_digest(renamed) != digest
    meta = linear()
    onnx.helper.set_model_props(meta, {"note": "metadata does not compute"})
    assert model_digest(meta) == digest
