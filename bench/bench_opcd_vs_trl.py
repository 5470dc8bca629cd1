"""OPCD step throughput and peak memory, next to TRL doing the same work.

The peer is TRL's self-distillation trainer with a privileged context (``trl.experimental.sdft``,
``SDFTTrainer``), configured to do exactly what an OPCD step does: one on-policy sample per prompt
from the student (LoRA on the same base, no experience in context) at T=0.7 over the full vocabulary,
the base model (adapter disabled = the round-start weights) as the frozen teacher with the experience
in its prompt, reverse KL restricted to the student's top-256 tokens (``distillation_alpha=1``,
``distillation_mode="topk_logits"``), no importance-sampling correction, AdamW at a constant 1e-4,
gradient clipping at 1.0. Both sides use the same model folder and dtype, the same prompts, the same
teacher prompt text (the experience block in front of the question), the same LoRA (rank 16, alpha 32,
all linear layers), batch size and thread count; the answer length is fixed on both sides
(end-of-sequence suppressed until ``--response-tokens``) so both score the same number of tokens.

Each side runs in its own Python process (peak RSS = that process's ``ru_maxrss``, model load
included); sides alternate for ``--repeats`` rounds, and the best step throughput of each side is
reported (the machine is shared; the best run is the least disturbed one). Throughput = answer
tokens / wall time of the timed steps (sampling + scoring + update), after ``--warmup`` steps; also per
CPU second of the process over the same steps (one torch thread: the work done, which other jobs on the
machine disturb far less than the wall time).

Both sides load the model in the same ``--dtype``; ``auto`` (the default) is what the OPCD trainer picks on
this machine (bfloat16 where the CPU computes it natively, else float32: on a CPU without it, emulated
bfloat16 matmuls are many times slower than float32 ones and would swamp any other difference).

Run (the default model, one thread, a short and a long experience)::

    .venv/bin/python bench/bench_opcd_vs_trl.py --threads 1 --repeats 2
    .venv/bin/python bench/bench_opcd_vs_trl.py --experience-tokens 64 1500 --batch-size 4 --response-tokens 64 --steps 3

Needs ``trl`` (tested with trl 1.16.0; see the project's ``bench`` extra). Measured figures, and why one
thread: bench/README.md, "OPCD step throughput next to TRL".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

QUESTIONS = [
    "What is the capital of France?",
    "Name a fruit that is red.",
    "How many legs does a dog have?",
    "What colour is the sky on a clear day?",
    "Give me a word that rhymes with cat.",
    "What is 2 plus 3?",
    "Which animal says moo?",
    "What do bees make?",
    "Name a planet in our solar system.",
    "What is frozen water called?",
    "What is the opposite of hot?",
    "How many days are in a week?",
]

_TOPICS = ["greetings", "numbers", "animals", "colours", "food", "travel", "weather", "planets", "music", "sports"]


def experience_items(tokenizer, target_tokens: int) -> list[str]:
    """Plausible experience items, oldest first, adding up to about ``target_tokens`` tokens."""
    from learner.opcd.data import render_experience

    items: list[str] = []
    i = 0
    while True:
        topic = _TOPICS[i % len(_TOPICS)]
        item = (
            f"When the user asks about {topic} (case {i}), answer in one short sentence, "
            f"state the key fact first, and do not repeat the question."
        )
        if items and len(tokenizer.encode(render_experience(items + [item]), add_special_tokens=False)) > target_tokens:
            return items
        items.append(item)
        i += 1


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker_opcd(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from learner.opcd import OPCDConfig, OPCDTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    exp = experience_items(tok, args.experience_tokens)
    cfg = OPCDConfig(
        model_path=args.model,
        dtype=args.dtype,
        device="cpu",
        batch_size=args.batch_size,
        max_new_tokens=args.response_tokens,
        min_new_tokens=args.response_tokens,
        top_k=256,
        learning_rate=1e-4,
        lora_rank=16,
        lora_alpha=32,
        temperature=0.7,
        max_grad_norm=1.0,
        seed=0,
        teacher_cache_tokens=0 if args.no_prefix_cache else 32768,
    )
    trainer = OPCDTrainer(cfg, [[{"role": "user", "content": q}] for q in QUESTIONS], [exp])
    load_rss = _rss_now_mb()
    for _ in range(args.warmup):
        trainer.step()
    t0, c0 = time.perf_counter(), time.process_time()
    steps = [trainer.step() for _ in range(args.steps)]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(s.response_tokens for s in steps)
    return {
        "side": "opcd",
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "cpu_s": cpu,
        "tokens_per_cpu_s": tokens / cpu,
        "sample_s": sum(s.sample_seconds for s in steps) / len(steps),
        "train_s": sum(s.train_seconds for s in steps) / len(steps),
        "loss": [round(s.loss, 4) for s in steps],
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_load_mb": load_rss,
        "experience_items": len(exp),
        "teacher_prompt_tokens": len(trainer.teacher_prompt_ids(0, 0)),
    }


def worker_trl(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from learner.opcd.data import render_experience
    from oel.envs.prompts import EXPERIENCE_INTRO, SITUATION_HEADING

    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    exp = experience_items(tok, args.experience_tokens)
    total_steps = args.warmup + args.steps
    rows = [
        {"prompt": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "privileged_context": render_experience(exp)}
        for i in range(total_steps * args.batch_size)
    ]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    config = SDFTConfig(
        output_dir=str(Path(args.tmp) / "trl-out"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_generations=1,
        max_steps=total_steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        temperature=0.7,
        top_p=1.0,
        top_k=0,
        max_completion_length=args.response_tokens,
        generation_kwargs={"min_new_tokens": args.response_tokens},
        max_prompt_length=None,
        distillation_mode="topk_logits",
        distillation_topk=256,
        distillation_alpha=1.0,
        distillation_add_tail=False,
        distillation_is_clip=None,
        teacher_model_kind="base",
        teacher_prompt_template=EXPERIENCE_INTRO + "\n{privileged_context}\n\n" + SITUATION_HEADING + "\n{prompt}",
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        seed=0,
    )
    times: list[float] = []
    cpu_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            cpu_times.append(time.process_time() - self.c)

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SDFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora, callbacks=[Timer()]
    )
    load_rss = _rss_now_mb()
    trainer.train()
    timed = times[args.warmup :]
    tokens = args.batch_size * args.response_tokens * len(timed)
    wall = sum(timed)
    cpu = sum(cpu_times[args.warmup :])
    return {
        "side": "trl",
        "trl_version": trl.__version__,
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "cpu_s": cpu,
        "tokens_per_cpu_s": tokens / cpu,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_load_mb": load_rss,
        "experience_items": len(exp),
    }


def run_side(side: str, args: argparse.Namespace, experience_tokens: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--response-tokens",
        str(args.response_tokens),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--experience-tokens",
        str(experience_tokens),
        "--dtype",
        args.dtype,
        "--tmp",
        args.tmp,
    ]
    if args.no_prefix_cache:
        cmd.append("--no-prefix-cache")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model folder [default: the project's default model]")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--response-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best is reported")
    p.add_argument(
        "--experience-tokens",
        type=int,
        nargs="+",
        default=[64, 1500],
        help="experience sizes to compare (tokens of the rendered experience)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="weights dtype of both sides; auto = the OPCD trainer's choice on this CPU",
    )
    p.add_argument("--no-prefix-cache", action="store_true", help="OPCD without its teacher shared-prefix cache")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", choices=["opcd", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/oel-bench-opcd", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model is None:
        from oel.model.prepare import resolve_model_path
        from oel.settings import load_settings

        args.model = str(resolve_model_path(load_settings()))
    if args.dtype == "auto":
        from oel.model.hf_backend import resolve_dtype

        args.dtype = resolve_dtype("auto", "cpu")
    if args.worker:
        args.experience_tokens = args.experience_tokens[0]
        out = worker_opcd(args) if args.worker == "opcd" else worker_trl(args)
        print(json.dumps(out), flush=True)
        return

    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    print(
        f"model {args.model} ({args.dtype}); batch {args.batch_size} x {args.response_tokens} answer tokens; {args.threads} threads; "
        f"{args.warmup} warm-up + {args.steps} timed steps; best of {args.repeats} alternating runs",
        flush=True,
    )
    results = []
    for exp_tokens in args.experience_tokens:
        best: dict[str, dict] = {}
        runs: dict[str, list[dict]] = {"opcd": [], "trl": []}
        for r in range(args.repeats):
            for side in ("opcd", "trl") if r % 2 == 0 else ("trl", "opcd"):
                res = run_side(side, args, exp_tokens)
                runs[side].append(res)
                print(
                    f"  experience ~{exp_tokens} tok, run {r + 1} {side:4s}: {res['tokens_per_s']:7.2f} tok/s, "
                    f"{res['tokens_per_cpu_s']:7.2f} tok/CPU-s, peak RSS {res['peak_rss_mb']:7.0f} MB",
                    flush=True,
                )
                if side not in best or res["tokens_per_s"] > best[side]["tokens_per_s"]:
                    best[side] = res
        o, t = best["opcd"], best["trl"]
        row = {
            "experience_tokens": exp_tokens,
            "teacher_prompt_tokens": o.get("teacher_prompt_tokens"),
            "opcd_tokens_per_s": o["tokens_per_s"],
            "trl_tokens_per_s": t["tokens_per_s"],
            "throughput_ratio": o["tokens_per_s"] / t["tokens_per_s"],
            "opcd_tokens_per_cpu_s": max(x["tokens_per_cpu_s"] for x in runs["opcd"]),
            "trl_tokens_per_cpu_s": max(x["tokens_per_cpu_s"] for x in runs["trl"]),
            "opcd_peak_rss_mb": max(x["peak_rss_mb"] for x in runs["opcd"]),
            "trl_peak_rss_mb": max(x["peak_rss_mb"] for x in runs["trl"]),
            "trl_version": t.get("trl_version"),
            "runs": runs,
        }
        row["rss_ratio"] = row["opcd_peak_rss_mb"] / row["trl_peak_rss_mb"]
        row["cpu_ratio"] = row["opcd_tokens_per_cpu_s"] / row["trl_tokens_per_cpu_s"]
        results.append(row)

    print()
    print(
        f"{'experience':>10s} {'teacher prompt':>14s} {'OPCD tok/s':>11s} {'TRL tok/s':>10s} {'ratio':>6s} "
        f"{'OPCD peak RSS':>14s} {'TRL peak RSS':>13s} {'RSS ratio':>9s} {'tok/CPU-s ratio':>15s}"
    )
    for row in results:
        print(
            f"{row['experience_tokens']:>10d} {row['teacher_prompt_tokens'] or 0:>14d} {row['opcd_tokens_per_s']:>11.2f} "
            f"{row['trl_tokens_per_s']:>10.2f} {row['throughput_ratio']:>5.2f}x {row['opcd_peak_rss_mb']:>11.0f} MB "
            f"{row['trl_peak_rss_mb']:>10.0f} MB {row['rss_ratio']:>8.2f}x {row['cpu_ratio']:>14.2f}x"
        )
    print(f"(TRL {results[0]['trl_version']} SDFTTrainer; tokens/s = answer tokens per second of whole steps; best of {args.repeats})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
