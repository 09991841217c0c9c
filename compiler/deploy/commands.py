"""The deployment subcommands behind `python -m compiler bundle | build --bundle | run` (`compiler.cli`
parses the arguments and calls these)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from compiler.artifacts import write_bytes, write_json
from compiler.deploy.readme import BUILD_COMMAND
from compiler.errors import CompilerError
from compiler.settings import BuildSettings


def bundle_command(args: argparse.Namespace, settings: BuildSettings, print_variant: Any = None) -> int:
    """`bundle`: the pipeline up to verify (caches reused), then the bundle; built here too where
    TensorRT and a GPU are present. Prints the bundle's status and, when prepared, the command to
    run on the GPU host. Returns the exit status (0)."""
    from compiler.deploy.bundle import build_here_problem, build_into_bundle, prepare_bundle
    from compiler.pipeline import run_pipeline

    run = run_pipeline(settings, until="verify", after={"verify": print_variant} if print_variant else None)
    path = prepare_bundle(settings, run, args.out, command=getattr(args, "command_line", None), ort_fp32=args.ort_fp32)
    problem = build_here_problem()
    if problem is None:
        manifest = build_into_bundle(path, settings.engine, getattr(args, "command_line", None))
        print(f"bundle: {path} (status built: {', '.join(e['file'] for e in manifest['engines'])})")
        return 0
    print(f"bundle: {path}\nstatus: prepared (everything but the TensorRT plan: {problem})\n"
          f"On the GPU host that will serve it, with TensorRT 11:\n  {BUILD_COMMAND.format(dir=shlex.quote(str(path)))}")
    return 0


def build_bundle_command(args: argparse.Namespace, settings: BuildSettings, engine_given: bool) -> int:
    """`build --bundle DIR`: build the plan for this GPU into the bundle (exit 2 without TensorRT/GPU)."""
    from compiler.deploy.bundle import build_into_bundle

    manifest = build_into_bundle(args.bundle, settings.engine if engine_given else None,
                                 getattr(args, "command_line", None))
    for e in manifest["engines"]:
        print(f"engine: {args.bundle / e['file']} (compute capability {e['compute_capability']}, TensorRT "
              f"{e['tensorrt_version']}, {e['gpu']['name']})")
    return 0


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The `run` subcommand's arguments."""
    p.add_argument("bundle", type=Path, help="a bundle folder (manifest.json inside)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", action="append", help="a text to run (repeatable: one request, split into "
                                                      "batches the optimization profiles admit)")
    text.add_argument("--text-file", type=Path, help="one text a line, or a TSV/CSV or JSON Lines file "
                                                     "(its --text-column, default sentence or text)")
    p.add_argument("--text-column", default=None, help="with --text-file: the column or field of the texts")
    p.add_argument("--context", action="append", default=None,
                   help="question-answering: the passage to answer from, one per --text (the question)")
    text.add_argument("--prompt", action="append", help="with --generate: a prompt (repeatable; same as --text)")
    p.add_argument("--generate", type=int, default=None, metavar="N",
                   help="greedy-decode N tokens after each text on a text-generation(-with-past) bundle")
    p.add_argument("--no-cache", action="store_true", help="with --generate: recompute the whole prefix every step "
                                                           "instead of reusing the KV cache")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime's provider")
    p.add_argument("--allow-host-code", action="store_true",
                   help="load a version-compatible plan that embeds the lean runtime (executable host code)")
    p.add_argument("--truncate", action="store_true", help="cut texts at the profile's longest sequence "
                                                           "instead of refusing them")
    p.add_argument("--out", type=Path, default=None, help="where outputs go (default: <bundle>/../run)")
    p.add_argument("--check", action="store_true", help="compare with the bundled FP32 reference on these texts "
                                                        "and a few held-out real texts (alone: on those)")
    p.add_argument("--check-samples", type=int, default=16, help="held-out texts added by --check (default 16)")


def _texts(args: argparse.Namespace) -> list[str]:
    if args.prompt and args.generate is None:
        raise CompilerError("--prompt goes with --generate N (tokens to generate); to run texts through the "
                            "model once, use --text")
    if args.text or args.prompt:
        return list(args.text or args.prompt)
    if args.text_file is None:
        from compiler.deploy.hostcheck import heldout_sample

        texts = heldout_sample(args.check_samples) if args.check and args.generate is None else []
        if not texts:
            raise CompilerError("run: give the texts with --text TEXT (repeatable), --text-file FILE or, with "
                                "--generate N, --prompt TEXT" + ("; --check alone runs on held-out real text, "
                                "which is not on this host" if args.check else ""))
        args.check_samples = 0  # the held-out texts are the request: --check adds none
        args.truncate = True  # and are cut at the profile's longest sequence, as --check cuts them
        return texts
    from calibration.text import load_texts
    from compiler.settings import DataSettings

    if not args.text_file.is_file():
        raise CompilerError(f"--text-file {args.text_file}: no such file")
    data = DataSettings(path=str(args.text_file), text_column=args.text_column, min_words=1)
    texts = [t.strip() for t in load_texts(data, count=1 << 30, minimum=0)]  # --calib's readers
    if not texts:
        raise CompilerError(f"{args.text_file}: no text (one text a line, or a TSV/CSV/JSON Lines file "
                            "with --text-column)")
    return texts


RUN_OUTPUT_MAX_MIB = 4096  # the outputs `run` holds and writes at once (per-token outputs grow as texts x tokens)


def _check_output_size(outputs: list[dict[str, Any]], texts: int, sequence: int, source: Any) -> None:
    """Refuse a request whose outputs would exceed `RUN_OUTPUT_MAX_MIB` (a dynamic axis counted
    as `texts` on axis 0, `sequence` elsewhere; 4 bytes a value), before anything runs.

    Raises:
        CompilerError: naming the size and how many texts fit.
    """
    per_text = sum(int(np.prod([sequence if d < 0 else d for d in o["shape"][1:]] or [1])) for o in outputs) * 4
    mib = texts * per_text / 2**20
    if mib > RUN_OUTPUT_MAX_MIB:
        fit = max(1, int(RUN_OUTPUT_MAX_MIB * 2**20 // per_text))
        raise CompilerError(f"{texts} texts padded to {sequence} tokens give {mib:,.0f} MiB of outputs (more than "
                            f"{RUN_OUTPUT_MAX_MIB} MiB held and written at once): run at most {fit} texts a time"
                            + (f" (split {source})" if source else ""))


def run_command(args: argparse.Namespace) -> int:
    """`run`: load (after every check), run the texts, print a summary, write .npy and JSON outputs;
    with --check, the fidelity against the bundled FP32 reference."""
    from compiler.deploy.runtime import Bundle, sentence_embeddings

    texts = _texts(args)
    if args.context is not None and (args.check or args.generate is not None):
        raise CompilerError("--context goes with --text questions on a question-answering bundle; leave out "
                            "--check and --generate")
    if args.generate is not None:
        return generate_run(args, texts)
    bundle = Bundle.load(args.bundle, args.backend, args.device, args.allow_host_code)
    feeds = bundle.tokenize(texts, truncate=args.truncate, pairs=args.context)
    _check_output_size(bundle.manifest["io"]["outputs"], *feeds["input_ids"].shape, args.text_file)
    outputs = bundle.infer_batches(feeds)
    step = bundle.max_batch(feeds["input_ids"].shape[1])  # rows per request (texts beyond it: more requests)
    task = bundle.manifest["model"].get("task", "feature-extraction")
    # a sentence vector for the tasks that give one (a classifier's logits are no embedding)
    embeddings = sentence_embeddings(outputs, feeds, bundle.output_names[0]) \
        if task in ("feature-extraction", "sentence-embedding") else None
    out = args.out or args.bundle.resolve().parent / "run"
    files = {}
    for name, value in {**outputs, **({"embedding": embeddings} if embeddings is not None else {})}.items():
        buffer = _npy(value)
        files[name] = str(write_bytes(out / f"{name}.npy", buffer))
    summary: dict[str, Any] = {
        "bundle": str(args.bundle), "backend": bundle.backend,
        "engine": (bundle.engine or {}).get("file") or bundle.manifest["onnxruntime"]["file"],
        "texts": texts, "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "profile": bundle.request_profile(feeds),
        "requests": -(-len(texts) // step),
        "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype), "nonfinite": int(np.size(v) - np.isfinite(v).sum())}
                    for k, v in outputs.items()},
        "files": files,
    }
    print(f"{bundle.backend} on {summary['engine']}: {len(texts)} text(s), inputs "
          f"{summary['inputs'][bundle.input_names[0]]} in {summary['requests']} request(s) of <= {step} "
          f"(optimization profile {summary['profile']})")
    for name, o in summary["outputs"].items():
        print(f"  {name}: {o['dtype']} {o['shape']}, non-finite {o['nonfinite']}")
    if embeddings is not None:
        summary["embedding"] = {"shape": list(embeddings.shape),
                                "norms": [round(float(n), 6) for n in np.linalg.norm(embeddings, axis=1)]}
        how = "the graph's sentence_embedding" if "sentence_embedding" in outputs else \
            f"{bundle.output_names[0]} as it is" if outputs[bundle.output_names[0]].ndim == 2 else \
            f"mean of {bundle.output_names[0]} over unmasked tokens"
        print(f"  embedding: float32 {summary['embedding']['shape']} ({how})")
    from compiler.deploy.answers import answer_line, task_answers

    labels = bundle.manifest.get("labels") or {}
    answers = task_answers(task, outputs, feeds, bundle.tokenizer, labels.get("names"), paired=args.context is not None,
                           problem_type=labels.get("problem_type"))
    if answers is not None:
        summary["answers"] = answers
        print(f"answers ({task}):")
        for i, a in enumerate(answers):
            print(f"  [{i}] {answer_line(task, a)}")
    if args.check:
        from compiler.deploy.hostcheck import check_on_host, heldout_sample

        summary["check"] = check_on_host(bundle, texts + heldout_sample(args.check_samples))
        c = summary["check"]
        fmt = lambda v: "nan" if v is None else f"{v:.7f}"  # noqa: E731
        print(f"check: {c['backend']} ({c['engine']}) against {c['reference']} on {c['texts']} texts")
        print(f"  {'output':<20} {'cosine_min':>12} {'cosine_mean':>12} {'max_abs_err':>12} {'nonfinite':>10}")
        for name, o in c["outputs"].items():
            print(f"  {name:<20} {fmt(o['cosine_min']):>12} {fmt(o['cosine_mean']):>12} {fmt(o['max_abs_err']):>12} "
                  f"{o['nonfinite_count']:>10}")
    write_json(out / "run.json", summary)
    print(f"outputs: {out}/ (*.npy, run.json)")
    if args.check:
        from compiler.deploy.hostcheck import refuse_nonfinite_here

        refuse_nonfinite_here(summary["check"], out / "run.json")  # exit 4 after the figures are written
    return 0


def generate_run(args: argparse.Namespace, texts: list[str]) -> int:
    """`run --generate N`: greedy decoding on the bundle (`Bundle.generate`); prints each
    continuation and the tokens/s, writes `generate.json`. Exit 1 for a bundle of another task,
    4 for a run beyond the optimization profiles (refused before the first step)."""
    from compiler.deploy.bundle import read_manifest
    from compiler.deploy.generation import check_generation_task
    from compiler.deploy.runtime import Bundle

    if args.check or args.truncate:
        raise CompilerError("--check and --truncate do not apply to --generate: leave them out (a prompt too long "
                            "for the profiles is refused with the number of tokens that fit)")
    task = check_generation_task(read_manifest(args.bundle), args.bundle)  # before loading a backend
    bundle = Bundle.load(args.bundle, args.backend, args.device, args.allow_host_code)
    result = bundle.generate(texts, args.generate, use_cache=not args.no_cache)
    engine = (bundle.engine or {}).get("file") or bundle.manifest["onnxruntime"]["file"]
    for prompt, text in zip(texts, result.texts):
        print(f"{prompt!r} -> {text!r}")
    cache = "with the KV cache" if result.cached else "without the KV cache (the whole prefix every step)"
    print(f"{bundle.backend} on {engine} ({task}), {cache}: {sum(map(len, result.tokens))} tokens in "
          f"{result.seconds:.3f} s, {result.tokens_per_second:.1f} tokens/s ({len(texts)} prompt(s), "
          f"{len(result.batches)} batch(es))")
    out = args.out or args.bundle.resolve().parent / "run"
    write_json(out / "generate.json", {
        "bundle": str(args.bundle), "backend": bundle.backend, "engine": engine, "task": task,
        "cached": result.cached, "new_tokens": args.generate, "prompts": texts, "prompt_ids": result.prompts,
        "tokens": result.tokens, "texts": result.texts, "seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second})
    print(f"outputs: {out}/generate.json")
    return 0


def _npy(value: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(value))
    return buffer.getvalue()

