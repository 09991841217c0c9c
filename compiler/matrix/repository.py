"""One Triton model repository from the bundles of a matrix.

Each variant's bundle (`compiler.deploy.bundle`) is a model repository of its own: `<name>/`
(TensorRT, one plan per compute capability mapped by `cc_model_filenames`, since every target's
build went into the same bundle) and `<name>_onnxruntime/`. Here they are merged into one
folder that `tritonserver --model-repository DIR` serves: per variant one TensorRT model (only
when it has at least one plan: Triton refuses a model folder without its file) and its ONNX
Runtime model. Two variants whose names clash (the same model with pretrained and random
weights) get the weights appended, their `config.pbtxt` rewritten with the new name (Triton
requires the name to match the folder), parsed and written with Triton's schema
(`compiler.deploy.triton`). Files are hard links where the file system allows (plans and
ONNX are never edited in place), and the whole folder is written beside and swapped in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from compiler.artifacts import temp_beside, umask, writing
from compiler.deploy import triton
from compiler.deploy.bundle import read_manifest


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def _rename(folder: Path, name: str) -> None:
    config = triton.read_config(folder / "config.pbtxt")
    config.name = name
    os.unlink(folder / "config.pbtxt")  # a hard link to the bundle's file: replace, never write through
    triton.write_config(folder / "config.pbtxt", config)


def _unique(name: str, weights: str, taken: set[str]) -> str:
    candidate, n = name, 1
    if candidate in taken:
        candidate = f"{name}_{weights}"
    while candidate in taken:
        n += 1
        candidate = f"{name}_{weights}_{n}"
    return candidate


def combine(bundles: list[Path], dest: Path) -> list[dict[str, Any]]:
    """Merge `bundles` (distinct bundle folders) into the model repository `dest` (replaced).

    Returns:
        One entry per bundle: {"bundle", "tensorrt": model name or None (no plan yet),
        "onnxruntime": model name, "compute_capabilities": [...] of its plans}.

    Raises:
        compiler.errors.CompilerError: a bundle without a readable manifest, an invalid config,
            or a folder that cannot be written.
    """
    entries: list[dict[str, Any]] = []
    taken: set[str] = set()
    with writing(dest, directory=True) as tmp:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700: the repository follows the umask
        for bundle in bundles:
            manifest = read_manifest(bundle)
            name = manifest["name"]
            new = _unique(name, manifest["model"]["weights"], taken)
            engines = manifest.get("engines") or []
            models = [(f"{name}_onnxruntime", f"{new}_onnxruntime")]
            if engines:
                models.insert(0, (name, new))
            for old_name, new_name in models:
                _link_tree(bundle / old_name, tmp / new_name)
                if new_name != old_name:
                    _rename(tmp / new_name, new_name)
                taken.add(new_name)
            taken.add(new)
            entries.append({"bundle": str(bundle), "tensorrt": new if engines else None,
                            "onnxruntime": f"{new}_onnxruntime",
                            "compute_capabilities": sorted(e["compute_capability"] for e in engines)})
        old = temp_beside(dest, directory=True) if dest.exists() else None
        if old is not None:
            os.rmdir(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return entries
