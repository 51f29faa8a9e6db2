# shellcheck shell=bash
# Settings and helpers shared by the cluster scripts in this folder; sourced, never run.
# Every setting comes from the environment when set there (mk/cluster.mk passes make variables through).

SCRIPT="$(basename "$0")"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

CLUSTER_NAME="${CLUSTER_NAME:-d2mtl}"                    # kind cluster name
KUBE_CONTEXT="${KUBE_CONTEXT:-kind-$CLUSTER_NAME}"       # kubectl context; another one for an existing cluster
NAMESPACE="${NAMESPACE:-kubeflow}"                       # where KFP runs the pipeline pods
SECRET_NAME="${SECRET_NAME:-d2mtl-object-store}"         # object-store keys (pipeline.secret_name)
BUCKET="${BUCKET:-d2mtl}"                                # s3://$BUCKET/datasets and s3://$BUCKET/results
REGISTRY="${REGISTRY:-ghcr.io/distill-2md-mtl}"          # image names: $REGISTRY/d2mtl-<target>:$VERSION,
VERSION="${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml")}"  # as pipeline.images
GPU="${GPU:-0}"                                          # 1: a GPU worker (nvkind) and the CUDA training image
# shellcheck disable=SC2034  # read by the scripts that source this file
TARGETS=(ingest train-cpu train-cuda serve)              # the final stages of docker/Dockerfile

die() {
  echo "$SCRIPT: $*" >&2
  exit 1
}

need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed; see docs/kind.md, Prerequisites"
  done
}

need_docker_daemon() {
  docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable; start Docker and retry"
}

kube() {
  kubectl --context "$KUBE_CONTEXT" "$@"
}

need_cluster() {
  kube get namespace "$NAMESPACE" >/dev/null 2>&1 \
    || die "no namespace $NAMESPACE through kubectl context $KUBE_CONTEXT; is the cluster up (scripts/kind-up)?"
}

image() {
  echo "$REGISTRY/d2mtl-$1:$VERSION"
}

cluster_exists() {
  # no grep -q: under pipefail, grep leaving early could fail kind with SIGPIPE
  kind get clusters 2>/dev/null | grep -x "$CLUSTER_NAME" >/dev/null
}

d2mtl_command() {
  local found
  found="${D2MTL:-$(command -v d2mtl || echo "$REPO/.venv/bin/d2mtl")}"
  [ -x "$found" ] || die "d2mtl not found; run 'make venv' (or set D2MTL to its path)"
  echo "$found"
}

# Forward localhost:$2 to port $3 of service $1 in $NAMESPACE until the calling script exits.
port_forward() {
  # kubectl itself, not the kube function: $! must be the process that the EXIT trap stops.
  kubectl --context "$KUBE_CONTEXT" -n "$NAMESPACE" port-forward "svc/$1" "$2:$3" >/dev/null &
  FORWARD_PID=$!
  trap 'kill "$FORWARD_PID" 2>/dev/null' EXIT
  local _
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then
      return 0
    fi
    kill -0 "$FORWARD_PID" 2>/dev/null \
      || die "port-forward to svc/$1 in $NAMESPACE failed; is the cluster up (scripts/kind-up)?"
    sleep 0.2
  done
  die "svc/$1 did not answer on localhost:$2"
}
