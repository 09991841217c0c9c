"""Benchmarks: scripts that measure the toolchain on real models and text (not tests).

Run each from the repository root as `python -m benchmarks.NAME [--help]`. Each prints a table
and writes JSON under its `--out` folder (default `engines/benchmarks/`); where a plot helps it
also writes a PNG, when matplotlib is installed (the `bench` extra).

- `precision_modes`: fp16 / hybrid / auto on MiniLM and a planted FP16 hazard, held-out text
  vs random ids (pipeline up to verify). Writes `precision_modes.json`, `precision_modes.png`.
- `int8_ptq`: INT8 PTQ of MiniLM per calibration method x attention bmm x SmoothQuant, against
  ONNX Runtime's `quantize_static`; thresholds, QDQ fusion, hybrid FP16 + INT8, ORT CPU latency.
  Writes `int8_ptq.json` (export and caches under `int8_ptq/`).
- `int8_minilm`: MiniLM through the pipeline's INT8 (PTQ, QAT) and 2:4 options, held-out
  fidelity and MAC shares per row. Writes `int8_minilm.json` (with each row's ONNX path).
- `recovery_sweep`: short 2:4 recovery runs per pruning method and learning rate, PyTorch
  cosine on held-out text and SST-2 dev. Appends to `recovery_sweep.json`.
- `sparsegpt_start`: the 2:4 starting point per pruning method (magnitude, Wanda, SparseGPT) on
  MiniLM and held-out cosine against recovery minutes. Writes `sparsegpt_start.json`, `.png`.
- `recovery_curve`: the held-out cosine curves that 2:4 runs record in `sparsity_report.json`,
  against training minutes, side by side. Writes `recovery_curve.json`, `.png`.
- `sst2_probe`: SST-2 dev accuracy of a fixed logistic-regression probe per ONNX graph.
  Writes `sst2_probe.json` and caches embeddings under `cache/`.
- `ort_latency`: ONNX Runtime CPU latency and throughput per graph and batch shape on real
  token ids. Writes `ort_latency.json`, `ort_latency.png`.
- `vocab_prune`: MiniLM pruned to SST-2's vocabulary: sizes, fidelity on SST-2 dev and WikiText-2
  with OOV rates, ORT CPU latency with the remap in the graph and without it; BERT-base's
  parameter share saved. Writes `vocab_prune.json`, `vocab_prune.png`.
- `peak_memory`: wall time and peak RSS of a command's whole process tree. Writes
  `peak_memory.json` (or `--json FILE`).
- `latency`: latency and throughput over the paper's batch x sequence grid, every backend side
  by side (PyTorch, ONNX Runtime FP32 / fused / our INT8 / dynamic INT8, OpenVINO, TensorRT and
  the CUDA rows where a GPU is), each with its held-out cosine against PyTorch FP32. Writes
  `<model>/latency.json`, `latency.md`, `latency_p50.png`, `latency_speedup.png`; its parts
  live in `benchmarks/speed/`.
- `compile_cost`: each stage's wall time and peak memory per model x precision mode, compiled
  from scratch in a subprocess (the way to track what compiling costs). Writes `compile.json`,
  `compile.md`.

- `gpt2_fixture`: trains the small GPT-2 fixture on WikiText-2 (tokenizer and model, seeded) into
  its `--out` checkpoint folder with `fixture.json`.
- `gpt2_agreement`: greedy generation of the fixture per precision through the KV cache against
  FP32 PyTorch `generate`. Writes `gpt2_agreement.json`.
- `gpt2_generate`: GPT-2 tokens per second on ONNX Runtime CPU with the KV cache and without it.
  Writes `gpt2_generate.json`.
- `sst2_classifier`: fine-tunes MiniLM with a classification head on SST-2 train (seeded) into its
  `--out` checkpoint folder with `fixture.json`.
- `sst2_tasks`: SST-2 dev accuracy and agreement with FP32 of the classifier per precision.
  Writes `sst2_tasks.json`.
- `op_profile`: ONNX Runtime CPU time per operator type of several graphs (why one is slower).
  Writes `op_profile.json`.
- `forward_cost`: ms per sample of an FP32 graph on ONNX Runtime and of its FP16 variant on the
  faithful FP16 reference, and the statistics' per-tensor reductions in GB/s: the floor under a
  compile's wall time. Writes `forward_cost.json`.
- `split_batches`: padding of the distillation batches on the recovery text and seconds a step,
  padded and split by length per sub-batch cost. Writes `split_batches.json`.

`benchmarks.common` holds what they share (NAME=PATH arguments, tables, JSON, plots).
"""

BENCHMARKS = ("precision_modes", "int8_ptq", "int8_minilm", "recovery_sweep", "sparsegpt_start", "sst2_probe", "ort_latency",
              "peak_memory", "vocab_prune", "latency", "compile_cost", "gpt2_fixture", "gpt2_agreement",
              "gpt2_generate", "sst2_classifier", "sst2_tasks", "op_profile", "recovery_curve",
              "forward_cost", "split_batches")
