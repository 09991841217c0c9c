"""The build matrix: models x precisions x GPU targets, run as Ray tasks (local by default).

- `spec`: the YAML spec, validated (`load_spec`), and each cell's `BuildSettings`;
- `targets`: GPU targets by compute capability or Ray accelerator label, and the Ray resource
  a build asks for;
- `cells`: the spec expanded into shared stages (one export per model, weights, sparsity and
  opset), variants (CPU work up to a prepared bundle) and cells (a variant on one target);
- `tasks`: the work each Ray task does, with retries and failure isolation;
- `records`, `report`: each cell's record, the JSON + Markdown report, and what a rerun reuses;
- `repository`: one Triton model repository from the cells' bundles;
- `runner`: `run_matrix`, what `python -m compiler matrix SPEC.yaml` calls.

Ray is imported inside functions only: importing this package needs neither Ray nor PyTorch.
"""
