"""One prepared GPU check: OPCD and generation throughput on CUDA next to the CPU, with the project's own
trainer (learner/opcd) and in-process backend (oel/model/hf_backend.py) placed by OEL_MODEL__DEVICE.

Runs offline with only PyTorch, transformers and peft (plus this repository's light dependencies): the model is
built from the default model's architecture (SmolLM2-135M: Llama, 30 layers, hidden 576) with random weights,
or a larger Qwen3-1.7B-sized Llama with ``--size 1.7b``; random weights are fine for speed. The tokenizer is the
tests' tiny one (the default model's when it is prepared, else a small BPE trained on the spot).

    python bench/gpu_check.py                       # CUDA (if torch sees it) and CPU, ~2-4 min on an H100
    python bench/gpu_check.py --size 1.7b --cpu-steps 0
    python bench/gpu_check.py --device cpu --steps 2 --cpu-steps 0   # the plumbing, anywhere

Prints, per device: OPCD seconds per step, response tokens trained per second, peak GPU memory; generation
tokens per second at batch 1 and 8. Put the figures in bench/README.md with the card's name.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

SIZES = {
    # the default model's architecture (SmolLM2-135M-Instruct)
    "135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # Qwen3-1.7B's width and depth as a Llama (no q/k norm): the paper's smaller model, for a realistic GPU load
    "1.7b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}


def build_model(size: str, dtype: torch.dtype, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, **SIZES[size])
    return LlamaForCausalLM(cfg).to(dtype)


def opcd(device: str, size: str, steps: int, batch: int, new_tokens: int) -> dict:
    from support.tiny_model import EXPERIENCE, PREFIXES, tiny_tokenizer

    from learner.opcd import OPCDConfig, OPCDTrainer
    from oel.model.hf_backend import resolve_dtype

    tok = tiny_tokenizer()
    dtype = getattr(torch, resolve_dtype("auto", device))
    model = build_model(size, dtype, max(len(tok), 1024))
    cfg = OPCDConfig(
        device=device,
        batch_size=batch,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        steps=steps,
        learning_rate=1e-4,
        seed=0,
        check_every=0,
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer = OPCDTrainer(cfg, PREFIXES * 4, EXPERIENCE, model=model, tokenizer=tok)
    trainer.step()  # warm-up (kernels, caches): not measured
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        tokens += trainer.step().response_tokens
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": steps,
        "batch": batch,
        "response_tokens": tokens,
        "s_per_step": seconds / max(1, steps),
        "train_tokens_per_s": tokens / seconds,
        "student_on": str(next(trainer.model.parameters()).device),
    }
    if device.startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del trainer, model
    return out


def generation(device: str, size: str, new_tokens: int) -> dict:
    from support.tiny_model import PREFIXES, tiny_tokenizer

    from oel.model.backend import SamplingParams
    from oel.model.hf_backend import HFBackend, resolve_dtype

    tok = tiny_tokenizer()
    dtype = resolve_dtype("auto", device)
    with tempfile.TemporaryDirectory() as d:
        build_model(size, getattr(torch, dtype), max(len(tok), 1024)).save_pretrained(d)
        tok.save_pretrained(d)
        backend = HFBackend(d, dtype=dtype, device=device, max_batch_size=8)
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.7, seed=0)
        backend.generate([PREFIXES[0]], SamplingParams(max_new_tokens=4, temperature=0.7, seed=0))  # warm-up
        out = {"device": device}
        for n in (1, 8):
            convs = [PREFIXES[i % len(PREFIXES)] for i in range(n)]
            t0 = time.perf_counter()
            gens = backend.generate(convs, params)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            out[f"gen_tokens_per_s_batch{n}"] = sum(len(g.response_token_ids) for g in gens) / (time.perf_counter() - t0)
        backend.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu [default: cuda when torch sees one]")
    ap.add_argument("--size", choices=sorted(SIZES), default="135m")
    ap.add_argument("--steps", type=int, default=8, help="measured OPCD steps on the device (after one warm-up)")
    ap.add_argument("--cpu-steps", type=int, default=2, help="measured OPCD steps on the CPU for comparison (0 = skip)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    from oel.model.hf_backend import resolve_device

    device = resolve_device(args.device or "auto")
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""),
        flush=True,
    )
    rows = []
    runs = [(device, args.steps)] + ([("cpu", args.cpu_steps)] if device != "cpu" and args.cpu_steps > 0 else [])
    for dev, steps in runs:
        t0 = time.monotonic()
        row = opcd(dev, args.size, steps, args.batch, args.new_tokens) | generation(dev, args.size, args.new_tokens)
        row["wall_s"] = time.monotonic() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\n| device | dtype | OPCD s/step (batch {args.batch} x {args.new_tokens} tok) | OPCD train tok/s | peak GPU MiB "
        "| gen tok/s batch 1 | gen tok/s batch 8 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['device']} | {r['dtype']} | {r['s_per_step']:.2f} | {r['train_tokens_per_s']:.0f} | "
            f"{r.get('peak_gpu_mib', float('nan')):.0f} | {r['gen_tokens_per_s_batch1']:.1f} | {r['gen_tokens_per_s_batch8']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
