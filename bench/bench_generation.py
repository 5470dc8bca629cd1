"""Generation throughput: the in-process transformers backend vs. vLLM (CPU), side by side.

Same prompts, same sampling (greedy), batch 1 and 8, with and without a LoRA adapter. Throughput is
generated tokens (``response_token_ids``, end token included) divided by the wall time of one
``generate`` call; each cell is the median of ``--repeats`` timed calls after one warm-up call, the
two backends alternating call by call so that both see the same background load.
The adapter is a random rank-8 LoRA on q_proj/v_proj (as in tests/test_vllm_backend.py), loaded in
both backends under a versioned name, unless ``--adapter`` names a PEFT folder.

The vLLM server must be running (``bash infra/local/vllm.sh up``); the in-process backend runs in this
process. Only one backend works at a time, so they never compete with each other for the cores.

Run:  .venv/bin/python bench/bench_generation.py            (all cells)
      .venv/bin/python bench/bench_generation.py --backends hf --batch-sizes 1
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from oel.model.backend import Backend, SamplingParams
from oel.schemas import ChatMessage

PROMPTS = [
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a bicycle works, from the pedals to the wheels.",
    "Describe a busy market in a small coastal town early in the morning.",
    "Write a long letter from a traveller to a friend about crossing the mountains.",
    "Explain in detail why the seasons change during the year.",
    "Tell a story about a robot that learns to paint, with many details.",
    "Describe how to plan a vegetable garden, season by season.",
    "Write a detailed description of an old library and the people who visit it.",
]


def conversations(n: int) -> list[list[ChatMessage]]:
    return [[ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])] for i in range(n)]


def make_random_adapter(model_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(out)
    return out


def timed(backend: Backend, convs: list, adapter: str | None, params: SamplingParams) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) of one generate call."""
    start = time.perf_counter()
    gens = backend.generate(convs, params, adapter=adapter)
    elapsed = time.perf_counter() - start
    tokens = sum(g.response_tokens for g in gens)
    return tokens / elapsed, tokens, elapsed


def main(argv: list[str] | None = None) -> int:
    from oel.settings import load_settings

    settings = load_settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="HF model folder (default: the configured/default model)")
    parser.add_argument("--vllm-url", default=settings.model.vllm_url)
    parser.add_argument("--backends", default="hf,vllm", help="comma-separated: hf, vllm")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapter", type=Path, default=None, help="a PEFT LoRA folder (default: a random rank-8 one)")
    parser.add_argument("--no-adapter-runs", action="store_true", help="only the base model")
    args = parser.parse_args(argv)

    from oel.model.prepare import resolve_model_path

    model_dir = args.model or resolve_model_path(settings)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0)
    tmp = tempfile.TemporaryDirectory(prefix="oel-bench-gen-")
    adapter_dir = None if args.no_adapter_runs else (args.adapter or make_random_adapter(model_dir, Path(tmp.name) / "adapter"))
    adapter_name = f"bench-{uuid.uuid4().hex[:8]}-v1"
    adapters: list[str | None] = [None] if adapter_dir is None else [None, adapter_name]

    # Both backends are loaded first; then every cell alternates between them call by call, so
    # the two see the same background load on a shared machine.
    live: dict[str, Backend] = {}
    try:
        for name in backends:
            if name == "hf":
                from oel.model.hf_backend import HFBackend, resolve_dtype

                t0 = time.perf_counter()
                live[name] = HFBackend(model_dir, dtype=resolve_dtype(settings.model.dtype), max_batch_size=max(args.batch_sizes))
                print(f"in-process backend loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            elif name == "vllm":
                from oel.model.vllm_backend import VLLMBackend

                live[name] = VLLMBackend(args.vllm_url)
                live[name].health()
                if Path(live[name].base_model).resolve() != Path(model_dir).resolve():
                    print(f"warning: vLLM serves {live[name].base_model}, the in-process backend loads {model_dir}", file=sys.stderr)
            else:
                parser.error(f"unknown backend {name!r}")
            if adapter_dir is not None:
                live[name].load_adapter(adapter_name, adapter_dir)

        samples: dict[tuple[str, int, str | None], list[tuple[float, int, float]]] = {}
        load_before = os.getloadavg()
        for adapter in adapters:
            for batch in args.batch_sizes:
                convs = conversations(batch)
                for name in backends:  # warm-up
                    live[name].generate(convs[: min(batch, 2)], SamplingParams(max_new_tokens=4, temperature=0), adapter=adapter)
                for _ in range(args.repeats):
                    for name in backends:
                        sample = timed(live[name], convs, adapter, params)
                        samples.setdefault((name, batch, adapter), []).append(sample)
                        print(
                            f"  {name:5s} batch {batch:2d} adapter {'yes' if adapter else 'no ':3s}: {sample[0]:7.1f} tok/s "
                            f"({sample[1]} tokens in {sample[2]:.1f}s)",
                            file=sys.stderr,
                        )
        if adapter_dir is not None:
            for backend in live.values():
                backend.unload_adapter(adapter_name)
    finally:
        for backend in live.values():
            backend.close()
    results = {key: statistics.median(s[0] for s in runs) for key, runs in samples.items()}
    load_after = os.getloadavg()

    label = {"hf": "in-process (transformers)", "vllm": "vLLM CPU"}
    header = ["batch", "adapter"] + [f"{label[b]} tok/s" for b in backends]
    if backends == ["hf", "vllm"]:
        header.append("vLLM / in-process")
    rows = []
    for adapter in adapters:
        for batch in args.batch_sizes:
            row = [str(batch), "LoRA r8" if adapter else "none"]
            row += [f"{results[(b, batch, adapter)]:.1f}" for b in backends]
            if backends == ["hf", "vllm"]:
                row.append(f"{results[('vllm', batch, adapter)] / results[('hf', batch, adapter)]:.2f}x")
            rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\nGeneration throughput, {model_dir.name}, greedy, {args.max_new_tokens} new tokens max, median of {args.repeats}")
    print(f"({os.cpu_count()} CPUs; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)\n")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    command = " ".join(
        shlex.quote(a) for a in [".venv/bin/python", "bench/bench_generation.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"\nReproduce: bash infra/local/vllm.sh up && {command}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
