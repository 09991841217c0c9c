"""The SST-2 classifier fixture: MiniLM (all-MiniLM-L6-v2) fine-tuned with a classification head
on SST-2 train, reproducibly, in a few minutes of CPU.

    python -m benchmarks.sst2_classifier [--train-samples 6000] [--epochs 1] \
        [--out engines/fixtures/minilm-sst2]

Recipe: `BertForSequenceClassification` (2 labels) from the packaged MiniLM weights (the head
is new, seeded), the first `--train-samples` rows of `sst2/train.tsv` shuffled with `--seed`,
max 64 tokens, batch 32, AdamW lr 5e-5 with linear warm-up (6 %) and decay, dropout on, one
thread. Saved with safetensors (`save_pretrained`) with its tokenizer and `fixture.json`
(dev accuracy of the PyTorch FP32 model, seconds): a local checkpoint whose natural task is
`text-classification` (`MODEL=engines/fixtures/minilm-sst2`).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


def read_tsv(path: Path) -> tuple[list[str], np.ndarray]:
    """(sentences, labels (n,) int64) of an SST-2 TSV with a `sentence` and a `label` column."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], np.array([int(r["label"]) for r in rows], dtype=np.int64)


def accuracy(model, tokenizer, texts: list[str], labels: np.ndarray, batch: int = 64) -> float:
    import torch

    preds = []
    with torch.no_grad():
        for s in range(0, len(texts), batch):
            enc = tokenizer(texts[s:s + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            preds.append(model(**enc).logits.argmax(-1).numpy())
    return float((np.concatenate(preds) == labels).mean())


def main(argv: list[str] | None = None) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from compiler.training.models import REGISTRY

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-samples", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("engines/fixtures/minilm-sst2"))
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    start = time.perf_counter()
    where = str(REGISTRY["minilm"].hub_id())
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModelForSequenceClassification.from_pretrained(
        where, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    texts, labels = read_tsv(DATA / "train.tsv")
    order = np.random.default_rng(args.seed).permutation(len(texts))[: args.train_samples]
    batch = 32
    steps = args.epochs * (len(order) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    model.train()
    step = 0
    for epoch in range(args.epochs):
        perm = np.random.default_rng(args.seed + epoch).permutation(order)
        for s in range(0, len(perm) - batch + 1, batch):
            idx = perm[s:s + batch]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
            loss = model(**enc, labels=torch.from_numpy(labels[idx])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{steps}: loss {float(loss):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    tokenizer.save_pretrained(str(args.out))
    dev_texts, dev_labels = read_tsv(DATA / "dev.tsv")
    info = {"train_samples": len(order), "epochs": args.epochs, "steps": steps, "seed": args.seed,
            "dev_accuracy_pytorch_fp32": round(accuracy(model, tokenizer, dev_texts, dev_labels), 4),
            "seconds": round(time.perf_counter() - start, 1)}
    (args.out / "fixture.json").write_text(json.dumps(info, indent=1))
    print(f"classifier: {args.out} dev accuracy {info['dev_accuracy_pytorch_fp32']} ({info['seconds']} s)")
    return info


if __name__ == "__main__":
    main()
