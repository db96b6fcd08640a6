"""GPU throughput through the product's classifier, and its share of the chip's bf16 FLOP bound.

A GPU host classifies with ``load_classifier(device="cuda")``: bf16 weights, the version's LoRA
adapter and head, ``classify(texts)`` (tokenise, length-sorted batches, softmax). This benchmark
runs exactly that on model shapes people would serve (random weights; the numbers depend on the
shapes only):

- ``minilm``: all-MiniLM-L6-v2's shape (BERT, 6 x 384);
- ``qwen2-0.5b`` / ``qwen2-1.5b``: Qwen2.5-0.5B's and 1.5B's shapes (24 x 896 and 28 x 1536, GQA).

For each shape it writes a random base, trains a version on 64 synthetic mails (one epoch: only
to get a real adapter and head), loads it as the daemon does and classifies ``--emails`` mails of
``--tokens`` tokens each at every ``--batch`` size. Each row reports emails/s of ``classify`` (the
product path, wall clock, tokenising included) and of the forward pass alone on the same batch
already on the GPU, and the FLOP rate both reach as a share of ``--peak`` (H200 bf16 dense: 989
TFLOP/s). FLOPs per mail are counted from the shape: 2 x (weights of every Linear layer of the
transformer, head excluded) x tokens, plus 4 x layers x width x tokens^2 for attention scores and
their weighted sum (no causal halving). Each row is also taken with the adapter merged into the
base weights (what the loader does on a GPU) and unmerged; ``--no-merge-rows`` skips the unmerged
ones, ``--compile`` adds rows with ``[model] compile = true``.

    python -m benchmarks.gpu [--models minilm,qwen2-0.5b,qwen2-1.5b] [--batch 64,128,256]
                             [--emails 4096] [--tokens 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "minilm": ("bert", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                            vocab_size=30522, max_position_embeddings=512)),
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                 max_position_embeddings=32768, tie_word_embeddings=True)),
    "qwen2-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                 max_position_embeddings=32768, tie_word_embeddings=True)),
    # A CPU smoke test of this script: the same code path in seconds.
    "tiny": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024,
                           tie_word_embeddings=True)),
}
LABELS = ("billing", "login", "refunds", "shipping")
WORDS = ("invoice billing login password refund refunds parcel shipping delivery order account payment card bank "
         "hello dear team support customer thanks regards please urgent problem error help question request "
         "subject re fwd wrote date monday tuesday march april product price plan subscription address").split()


def _texts(n: int, words_each: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_each)) for _ in range(n)]


def _tokenizer(family: str) -> Any:
    """A small tokenizer for the synthetic mail: every word of WORDS is one token, so a mail of N
    words is about N tokens and the rows come out exactly --tokens long after truncation."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<|endoftext|>"] + sorted(set(WORDS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", model_max_length=4096)
    # Like a real decoder's: no pad token, so the loader falls back to EOS.
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>",
                                   model_max_length=4096)


def _config(family: str, shape: dict[str, Any]) -> Any:
    from transformers import BertConfig, Qwen2Config

    if family == "bert":
        return BertConfig(**shape, pad_token_id=0)
    return Qwen2Config(**shape, eos_token_id=4, bos_token_id=None, pad_token_id=None)


def build_base(name: str, directory: Path, device: str) -> Path:
    """A random-weight base of shape ``name`` saved in bf16 with its tokenizer."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    family, shape = SHAPES[name]
    config = _config(family, shape)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.5B weights on a GPU takes a second, on a CPU a minute
        model = (AutoModel if family == "bert" else AutoModelForCausalLM).from_config(config, dtype=torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    _tokenizer(family).save_pretrained(directory)
    del model
    return directory


def flops_per_email(name: str, tokens: int) -> float:
    """Forward FLOPs of one mail of ``tokens`` tokens through the transformer (no head)."""
    import torch
    from transformers import AutoModel

    family, shape = SHAPES[name]
    with torch.device("meta"):
        model = AutoModel.from_config(_config(family, shape))
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)
                 and m.out_features != shape["vocab_size"])
    if family == "bert":  # BERT's pooler runs once per mail, not per token
        linear -= shape["hidden_size"] ** 2
        pooler = 2 * shape["hidden_size"] ** 2
    else:
        pooler = 0
    attention = 4 * shape["num_hidden_layers"] * shape["hidden_size"] * tokens * tokens
    return 2.0 * linear * tokens + attention + pooler


def train_version(base: Path, out: Path, device: str, tokens: int) -> Path:
    from mailtriage.core.labels import LabelSet
    from mailtriage.core.training import TrainParams
    from mailtriage_trainer.finetune import finetune

    rng = random.Random(1)
    texts = _texts(80, tokens // 4, seed=2)
    rows = [(text, rng.choice(LABELS)) for text in texts]
    params = TrainParams(epochs=1, batch_size=16, max_length=tokens, device=device, patience=1, warmup=0.0)
    finetune(base, rows[:64], rows[64:], LabelSet(LABELS), out, params, progress=False)
    return out


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure(clf: Any, texts: list[str], batch: int, device: str, tokens: int, repeats: int) -> dict[str, float]:
    """emails/s of ``clf.classify`` over ``texts`` and of the forward pass alone at ``batch``."""
    import torch

    from mailtriage.model.transformers import autocast, collate, tokenize

    clf.batch_size = batch
    clf.classify(texts[: 2 * batch])  # warm-up: kernels chosen, allocator grown
    _sync(device)
    started = time.perf_counter()
    predictions = clf.classify(texts)
    _sync(device)
    product = len(texts) / (time.perf_counter() - started)
    assert len(predictions) == len(texts) and all(p.label in LABELS for p in predictions)

    ids = tokenize(clf.tokenizer, texts[:batch], clf.max_length, clf.truncation)
    assert min(len(r) for r in ids) == tokens, "the synthetic mails must fill --tokens"
    inputs = collate(clf.tokenizer, ids, device)
    with torch.inference_mode(), autocast(device):
        clf.model(**inputs)
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            clf.model(**inputs).logits.float()
        _sync(device)
    forward = batch * repeats / (time.perf_counter() - started)
    return {"classify_emails_s": product, "forward_emails_s": forward}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,qwen2-0.5b,qwen2-1.5b")
    parser.add_argument("--batch", default="64,128,256")
    parser.add_argument("--emails", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per batch size")
    parser.add_argument("--peak", type=float, default=989e12, help="the chip's dense bf16 FLOP/s")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-merge-rows", action="store_true", help="only the loader's own (merged) rows")
    parser.add_argument("--compile", action="store_true",
                        help="also rows with [model] compile = true (torch.compile of the merged model)")
    parser.add_argument("--out", type=Path, default=None, help="write gpu.json here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from mailtriage.model.transformers import load_classifier

    batches = [int(b) for b in args.batch.split(",")]
    info = {"torch": torch.__version__, "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "tokens": args.tokens, "emails": args.emails, "peak_flops": args.peak}
    print(json.dumps(info), flush=True)
    rows: list[dict[str, Any]] = []
    texts = _texts(args.emails, args.tokens + 64, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            t0 = time.perf_counter()
            base = build_base(name, Path(tmp) / f"base-{name}", args.device)
            version = train_version(base, Path(tmp) / f"version-{name}", args.device, args.tokens)
            flops = flops_per_email(name, args.tokens)
            setup = time.perf_counter() - t0
            variants = ["merged"] + ([] if args.no_merge_rows else ["unmerged"]) + (["compiled"] if args.compile else [])
            for variant in variants:
                merged = variant != "unmerged"
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t1 = time.perf_counter()
                clf = load_classifier(version, device=args.device, max_length=args.tokens,
                                      compile=variant == "compiled")
                if not merged:  # the adapter applied beside the base weights, as loaded before merging
                    from mailtriage.model import transformers as tf

                    del clf.model
                    clf.model = tf._load_adapted(clf.path, str(base), tf.LabelSet(LABELS), clf.tokenizer,
                                                 tf.pick_dtype(args.device), args.device)
                if variant == "compiled":  # the first batch compiles: its time is the start-up cost
                    measure(clf, texts[:batches[0] * 2], batches[0], args.device, args.tokens, 1)
                    print(json.dumps({"model": name, "load_and_compile_s": round(time.perf_counter() - t1, 1)}),
                          flush=True)
                for batch in batches:
                    got = measure(clf, texts, batch, args.device, args.tokens, args.repeats)
                    row = {"model": name, "adapter": variant, "batch": batch,
                           "gflop_per_email": round(flops / 1e9, 2), **{k: round(v, 1) for k, v in got.items()},
                           "classify_share": round(got["classify_emails_s"] * flops / args.peak, 3),
                           "forward_share": round(got["forward_emails_s"] * flops / args.peak, 3),
                           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                           if args.device == "cuda" else None,
                           "setup_s": round(setup, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del clf
    print("\n| model | adapter | batch | GFLOP/mail | classify emails/s | share of peak | forward-only emails/s | share | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['adapter']} | {r['batch']} | {r['gflop_per_email']} | {r['classify_emails_s']:,.0f} | "
              f"{r['classify_share']:.0%} | {r['forward_emails_s']:,.0f} | {r['forward_share']:.0%} | {r['peak_gpu_gib']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
