"""Extraction throughput: the in-process backend (batched) next to the vLLM CPU server (continuous batching).

The model-written extraction variants (``structured``, ``unstructured``: the paper's prompts, for models
that can abstract a lesson) send one prompt per episode of a batch to the model
(:func:`oel.extraction.build_prompt`, sampled at the processor's temperature and answer budget). This
times exactly that call, ``Backend.generate`` on a batch of real stored episodes, on both backends: the
base model in this process (:class:`oel.model.hf_backend.HFBackend`, the dtype the settings resolve to)
and the vLLM server the settings point at (:class:`oel.model.vllm_backend.VLLMBackend`), alternating batch
by batch so that both see the same background load. Figures: episodes extracted per minute and generated
tokens per second, best and median over the batches.

Episodes come from a store's training data (``trajectories/<namespace>/``), e.g. an ``oel demo`` run's::

    bash infra/local/vllm.sh up
    .venv/bin/python bench/bench_extraction.py --store-dir oel-demo/store --namespace house-rules --batch 8 --batches 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from oel.episodes import CompletedEpisode
from oel.extraction import ExtractionConfig, PromptVariant, build_prompt
from oel.model.backend import Backend, SamplingParams
from oel.settings import Settings
from oel.store import LocalStore


def load_episodes(store_dir: Path, namespace: str) -> list[CompletedEpisode]:
    store = LocalStore(store_dir)
    keys = sorted(store.list(f"trajectories/{namespace}/"))
    if not keys:
        raise SystemExit(f"no training data under {store_dir}/trajectories/{namespace}/ (run oel demo first)")
    return [CompletedEpisode.model_validate_json(store.get_bytes(k)) for k in keys]


def time_batch(backend: Backend, prompts, params: SamplingParams) -> tuple[float, int]:
    t0 = time.monotonic()
    outs = backend.generate(prompts, params)
    return time.monotonic() - t0, sum(len(o.response_token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store-dir", type=Path, default=Path("oel-demo/store"))
    ap.add_argument("--namespace", default="house-rules")
    ap.add_argument("--variant", choices=("structured", "unstructured"), default="structured")
    ap.add_argument("--batch", type=int, default=None, help="episodes per extraction call (default OEL_PROCESSOR__BATCH_SIZE)")
    ap.add_argument("--batches", type=int, default=3, help="timed batches per backend, after one warm-up batch each")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default OEL_PROCESSOR__MAX_NEW_TOKENS")
    args = ap.parse_args()

    from oel.model.hf_backend import HFBackend
    from oel.model.vllm_backend import VLLMBackend

    settings = Settings()
    ps = settings.processor
    batch = args.batch or ps.batch_size
    params = SamplingParams(max_new_tokens=args.max_new_tokens or ps.max_new_tokens, temperature=ps.temperature, seed=0)
    config = ExtractionConfig(variant=PromptVariant(args.variant), include_previous=ps.include_previous)
    episodes = load_episodes(args.store_dir, args.namespace)
    need = batch * (args.batches + 1)
    episodes = (episodes * (need // len(episodes) + 1))[:need]
    batches = [[build_prompt(ep, [], config) for ep in episodes[i : i + batch]] for i in range(0, need, batch)]

    backends: dict[str, Backend] = {
        "in-process": HFBackend.from_settings(settings, max_batch_size=batch),
        "vLLM CPU": VLLMBackend.from_settings(settings),
    }
    print(
        f"{len(batches) - 1} batches of {batch} episodes, {args.variant} prompts, up to {params.max_new_tokens} tokens at "
        f"T={params.temperature}; in-process dtype {backends['in-process'].model.dtype}; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in backends}
    for i, prompts in enumerate(batches):
        for name, backend in backends.items():
            seconds, tokens = time_batch(backend, prompts, params)
            if i > 0:  # the first batch of each warms up
                runs[name].append((seconds, tokens))
                print(f"  batch {i} {name:>10}: {seconds:.1f} s, {tokens} tokens", flush=True)
    print(f"\nload {os.getloadavg()[0]:.1f} at the end")
    print(f"{'backend':>10}  {'episodes/min, best':>18}  {'median':>7}  {'tok/s, best':>11}  {'median':>7}")
    rates = {}
    for name, rows in runs.items():
        per_min = [60 * batch / s for s, _ in rows]
        tok_s = [t / s for s, t in rows]
        rates[name] = statistics.median(per_min)
        print(
            f"{name:>10}  {max(per_min):>18.1f}  {statistics.median(per_min):>7.1f}  {max(tok_s):>11.1f}  {statistics.median(tok_s):>7.1f}"
        )
    print(f"vLLM / in-process (median episodes/min): {rates['vLLM CPU'] / rates['in-process']:.2f}x")


if __name__ == "__main__":
    main()
