"""SST-2 dev accuracy of the fine-tuned MiniLM classifier per precision, and the share of its
predictions equal to FP32's.

    python -m benchmarks.sst2_classifier       # once: engines/fixtures/minilm-sst2
    python -m benchmarks.sst2_tasks [--modes fp32,fp16,hybrid,auto,int8,int8-qat,2:4+hybrid,2:4+int8-qat]

Each variant is compiled by the pipeline with `--task text-classification` up to verify
(`engines/tasks/`), calibrated and budgeted on SST-2 train sentences (`--calib sst2/train.tsv`:
the first 64 calibrate, the next 32 are held out). All 872 dev sentences then run on the variant
as the verify stage runs it (the faithful FP16 reference for graphs with FP16 tensors, ONNX
Runtime CPU otherwise), batches of 32 padded to the longest (max 128 tokens). Prints a table and
writes `engines/benchmarks/sst2_tasks.json`.

`int8-qat` fine-tunes the classifier by distillation from its FP32 self (last block output + logits,
`compiler.training.distill.split_outputs`) on SST-2 train sentences after the held-out ones; `2:4+MODE`
prunes the encoder's block linears 2:4 (Wanda), recovers them the same way, then applies MODE (2:4 +
int8-qat: QAT starts from the recovered student, the TensorRT 8 recipe). Every row is compared with
the dense FP32 classifier. Rows of variants not rerun are kept from the JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

FIXTURE = Path("engines/fixtures/minilm-sst2")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


def predictions(graph, tokenizer, texts: list[str], input_names: list[str], batch: int = 32) -> np.ndarray:
    """Argmax labels (n,) of `graph` (path or ModelProto) over `texts`."""
    from compiler.eval.fp16_reference import fp16_emulation, has_fp16, session
    from compiler.graph.onnx_io import load_onnx

    proto = load_onnx(graph) if isinstance(graph, Path) else graph
    sess = session(fp16_emulation(proto), True) if has_fp16(proto) else session(proto, False)
    out = []
    for s in range(0, len(texts), batch):
        enc = tokenizer(texts[s:s + batch], padding=True, truncation=True, max_length=128, return_tensors="np")
        out.append(sess.run(["logits"], {n: enc[n].astype(np.int64) for n in input_names})[0].argmax(-1))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.sst2_classifier import read_tsv
    from compiler.artifacts import write_json
    from compiler.pipeline import run_pipeline
    from compiler.settings import BuildSettings, DataSettings, EngineSettings, ModelSettings, PrecisionSettings
    from compiler.settings import ProfileSettings, SparsitySettings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixture", type=Path, default=FIXTURE)
    p.add_argument("--modes", default="fp32,fp16,hybrid,auto,int8,int8-qat,2:4+hybrid,2:4+int8-qat",
                   help="precision modes; `2:4+MODE` adds 2:4 sparsity with recovery")
    p.add_argument("--recover-steps", type=int, default=None,
                   help="2:4 recovery steps (default: SparsitySettings.recover_steps)")
    p.add_argument("--out", type=Path, default=Path("engines/benchmarks"), help="folder of the JSON")
    args = p.parse_args(argv)
    texts, labels = read_tsv(DATA / "dev.tsv")
    base = BuildSettings(model=ModelSettings(name=str(args.fixture), task="text-classification"),
                         data=DataSettings(path=str(DATA / "train.tsv"), samples=32, calib_samples=64),
                         output_dir="engines/tasks",  # SST-2 sentences are short: a 8x128 profile edge
                         engine=EngineSettings(profiles=(ProfileSettings(max_shape=(8, 128)),)))
    old = args.out / "sst2_tasks.json"
    kept = {r["variant"]: r for r in json.loads(old.read_text())["rows"]} if old.is_file() else {}
    fp32_pred = None
    sparsity = SparsitySettings(pattern="2:4", **({"recover_steps": args.recover_steps}
                                                  if args.recover_steps is not None else {}))
    for variant in args.modes.split(","):
        sparse, _, mode = variant.rpartition("+")
        run = run_pipeline(replace(base, precision=PrecisionSettings(mode=mode),
                                   sparsity=sparsity if sparse else base.sparsity),
                           until="verify")
        loaded = run.export.loaded
        pred = predictions(run.variant_onnx, loaded.tokenizer, texts, loaded.input_names)
        if fp32_pred is None:  # the dense FP32 classifier (a sparse run's reference)
            fp32_pred = predictions(run.reference_onnx, loaded.tokenizer, texts, loaded.input_names)
        fid = run.report["fidelity"]
        kept[variant] = {"variant": variant, "accuracy": float((pred == labels).mean()),
                         "equal_to_fp32": float((pred == fp32_pred).mean()),
                         "logits_cosine_min_heldout": fid["real"]["cosine_min"],
                         "label_agreement_heldout": fid.get("task", {}).get("label_agreement"),
                         "training": _training(run)}
    rows = list(kept.values())
    info = json.loads((args.fixture / "fixture.json").read_text()) if (args.fixture / "fixture.json").is_file() else {}
    print(f"SST-2 dev ({len(texts)} sentences), {args.fixture} (PyTorch FP32 accuracy "
          f"{info.get('dev_accuracy_pytorch_fp32')}); variants from the pipeline, --task text-classification")
    print(f"{'variant':<14} {'accuracy':>9} {'= FP32':>8} {'logits cos min (held-out)':>26}")
    for r in rows:
        print(f"{r['variant']:<14} {r['accuracy']:>9.4f} {r['equal_to_fp32']:>8.4f} "
              f"{r['logits_cosine_min_heldout']:>26.6f}")
    out = {"fixture": str(args.fixture), "fixture_info": info, "dev_sentences": len(texts), "rows": rows}
    write_json(args.out / "sst2_tasks.json", out)
    return out


def _training(run) -> dict:
    """Steps and seconds of the variant's 2:4 recovery and QAT (empty for a post-training variant)."""
    out = {}
    if (rec := (run.report.get("sparsity") or {}).get("recovery")):
        out["recovery"] = {"steps": rec["steps"], "seconds": rec["seconds"]}
    quant = run.settings.variant_dir() / "quant_report.json"
    if quant.is_file() and (qat := json.loads(quant.read_text()).get("training")):
        out["qat"] = {"steps": qat["steps"], "seconds": qat["seconds"]}
    return out


if __name__ == "__main__":
    main()
