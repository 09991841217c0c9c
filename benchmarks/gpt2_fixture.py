"""The GPT-2 fixture: a small GPT-2 trained here on WikiText-2, so greedy decoding has clear
winners and token agreement between precisions means something (random weights give near-tied
logits: any rounding flips the argmax).

    python -m benchmarks.gpt2_fixture [--steps 300] [--out engines/fixtures/gpt2-wikitext2]

What it makes, reproducibly (fixed seeds, one thread, the same text):
- a byte-level BPE tokenizer of 4,096 tokens trained on `wikitext-2/test.txt` (`tokenizers`);
- a GPT-2 (4 layers, 4 heads, width 128, 256 positions, tied LM head; `GPT2LMHeadModel`)
  trained with AdamW (lr 1e-3, cosine decay, 50 warm-up steps) on 128-token windows of the same
  text, batch 16, `--steps` steps;
- `config.json`, `model.safetensors`, the tokenizer files and `fixture.json` (loss curve,
  validation loss on `wikitext-2/valid.txt`, seconds) in `--out`: a local checkpoint for
  `MODEL=engines/fixtures/gpt2-wikitext2`.

The data README names `test.txt` and `valid.txt` only (no train split is shipped here): the
fixture trains on test and its prompts come from valid (`benchmarks.gpt2_agreement`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"
VOCAB = 4096
WINDOW = 128


def train_tokenizer(text_path: Path, out: Path):
    """A byte-level BPE tokenizer (GPT-2's scheme) of `VOCAB` tokens, saved into `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(text_path)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    return fast


def token_stream(tokenizer, path: Path) -> np.ndarray:
    """All non-empty lines of `path`, tokenized and joined with end-of-text tokens."""
    ids: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids += tokenizer(line.strip())["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


def evaluate(model, stream: np.ndarray, windows: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over the first `windows` 128-token windows."""
    import torch

    x = torch.from_numpy(stream[: windows * WINDOW].reshape(windows, WINDOW))
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


def main(argv: list[str] | None = None) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("engines/fixtures/gpt2-wikitext2"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = train_tokenizer(DATA / "test.txt", args.out)
    train, valid = token_stream(tokenizer, DATA / "test.txt"), token_stream(tokenizer, DATA / "valid.txt")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=4, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (args.steps - warm))))
    rng = np.random.default_rng(args.seed)
    losses = []
    model.train()
    for step in range(args.steps):
        starts = rng.integers(0, len(train) - WINDOW - 1, 16)
        x = torch.from_numpy(np.stack([train[s:s + WINDOW] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            losses.append((step, round(float(loss), 4)))
            print(f"step {step}: loss {float(loss):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(str(args.out), safe_serialization=True)
    info = {"steps": args.steps, "seed": args.seed, "train_tokens": int(len(train)), "losses": losses,
            "valid_loss": round(evaluate(model, valid), 4), "train_loss_eval": round(evaluate(model, train), 4),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "seconds": round(time.perf_counter() - start, 1), "config": config.to_dict()}
    (args.out / "fixture.json").write_text(json.dumps(info, indent=1, default=str))
    print(f"fixture: {args.out} valid loss {info['valid_loss']} (ppl {math.exp(info['valid_loss']):.1f}), "
          f"{info['seconds']} s")
    return info


if __name__ == "__main__":
    main()
