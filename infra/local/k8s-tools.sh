#!/usr/bin/env bash
# Tools that render and validate the Kubernetes manifests under k8s/ offline, installed idempotently:
#   kustomize            built with `go install` from the Go module proxy into the cache dir;
#   kubernetes-validate  from PyPI into .venv (pinned in pyproject's dev extra and constraints.txt).
# Usage: k8s-tools.sh install | install-kustomize | path   (path prints the kustomize binary's path)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

KUSTOMIZE_VERSION="v5.8.2"  # v5.8.3 needs go >= 1.27; this machine has go 1.26
KUBERNETES_VALIDATE_VERSION="1.37.0"
KUSTOMIZE_BIN="$OEL_CACHE_DIR/kustomize-$KUSTOMIZE_VERSION/kustomize"

install_kustomize() {
  if [[ -x "$KUSTOMIZE_BIN" && "$("$KUSTOMIZE_BIN" version 2>/dev/null)" == "$KUSTOMIZE_VERSION" ]]; then return 0; fi
  command -v go >/dev/null || die "kustomize: needs the Go toolchain (go install) to build $KUSTOMIZE_VERSION"
  say "kustomize: building sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION with go install (once)"
  local start=$SECONDS tmp
  tmp="$(dirname "$KUSTOMIZE_BIN").tmp.$$"
  mkdir -p "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  # -ldflags sets the version `kustomize version` reports (go install leaves it at "(devel)" otherwise).
  GOBIN="$tmp" GOFLAGS=-trimpath go install \
    -ldflags "-s -w -X sigs.k8s.io/kustomize/api/provenance.version=$KUSTOMIZE_VERSION" \
    "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  rm -rf "$(dirname "$KUSTOMIZE_BIN")"
  mv "$tmp" "$(dirname "$KUSTOMIZE_BIN")"
  trap - EXIT
  say "kustomize: $("$KUSTOMIZE_BIN" version) built in $(( SECONDS - start ))s"
}

install_validator() {
  local py="$OEL_REPO/.venv/bin/python"
  [[ -x "$py" ]] || die "kubernetes-validate: no .venv yet (run infra/install.sh first)"
  local shown; shown="$("$py" -m pip show kubernetes-validate 2>/dev/null || true)"
  if grep -qx "Version: $KUBERNETES_VALIDATE_VERSION" <<<"$shown"; then return 0; fi
  say "kubernetes-validate: installing $KUBERNETES_VALIDATE_VERSION into .venv"
  local constraints=()
  [[ -f "$OEL_REPO/constraints.txt" ]] && constraints=(-c "$OEL_REPO/constraints.txt")
  "$py" -m pip install -q --disable-pip-version-check "${constraints[@]}" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
}

case "${1:-}" in
  install) install_kustomize; install_validator ;;
  install-kustomize) install_kustomize ;;
  path) echo "$KUSTOMIZE_BIN" ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
