#!/usr/bin/env bash
# Real-cluster end-to-end test of the operator: builds both images, creates a kind (or k3d)
# cluster, installs the Helm chart, applies a Shard, waits for it to be Ready, runs a
# FederationRound to Succeeded, deletes the Shard and checks that everything is gone.
#
# Needs: docker (or podman as docker), kind or k3d, kubectl, and helm or
# `pip install helm-python-sdk==0.2.2`. Without them it says so and exits 0 (CI has no
# cluster) — unless OMEGA_E2E_REQUIRE=1, which makes a missing tool a failure (the
# `real_cluster_e2e` test sets it). The last line is `e2e/k8s: passed` only when every step ran.
# OMEGA_E2E_EXISTING_CLUSTER=1 uses the cluster of the current kubectl context instead of
# building images and creating one (the images must be pullable there: set
# OMEGA_OPERATOR_IMAGE / OMEGA_SHARD_IMAGE). KEEP=1 keeps the kind/k3d cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=omega-e2e
NS=omega-system
OP_IMAGE=${OMEGA_OPERATOR_IMAGE:-omega-operator:e2e}
SHARD_IMAGE=${OMEGA_SHARD_IMAGE:-omega-shard:e2e}

skip() {
  if [[ -n "${OMEGA_E2E_REQUIRE:-}" ]]; then
    echo "e2e/k8s: FAILED — OMEGA_E2E_REQUIRE is set but: $*" >&2; exit 1
  fi
  echo "e2e/k8s: SKIPPED — this test needs a Kubernetes cluster (kind or k3d) and a container engine: $*" >&2; exit 0
}

have() { command -v "$1" >/dev/null 2>&1; }
have kubectl || skip "kubectl not found"
created=""
if [[ -z "${OMEGA_E2E_EXISTING_CLUSTER:-}" ]]; then
  have docker || skip "docker not found"
  docker info >/dev/null 2>&1 || skip "no container engine running"
  docker build -f operator/Dockerfile -t "$OP_IMAGE" .
  docker build -f shard-server/Dockerfile -t "$SHARD_IMAGE" .
  if have kind; then
    kind get clusters | grep -qx "$CLUSTER" || { kind create cluster --name "$CLUSTER" --wait 120s; created=kind; }
    kind load docker-image --name "$CLUSTER" "$OP_IMAGE" "$SHARD_IMAGE"
    kubectl config use-context "kind-$CLUSTER"
  elif have k3d; then
    k3d cluster list "$CLUSTER" >/dev/null 2>&1 || { k3d cluster create "$CLUSTER" --wait; created=k3d; }
    k3d image import -c "$CLUSTER" "$OP_IMAGE" "$SHARD_IMAGE"
    kubectl config use-context "k3d-$CLUSTER"
  else
    skip "neither kind nor k3d found"
  fi
fi
cleanup() {
  kubectl delete -f e2e/k8s/round.yaml --ignore-not-found --wait=false || true
  kubectl delete -f e2e/k8s/shard.yaml --ignore-not-found --timeout=180s || true
  if [[ -n "$created" && -z "${KEEP:-}" ]]; then
    case "$created" in kind) kind delete cluster --name "$CLUSTER" ;; k3d) k3d cluster delete "$CLUSTER" ;; esac
  fi
}
trap cleanup EXIT

repo=${OP_IMAGE%:*}; tag=${OP_IMAGE##*:}
if have helm; then
  helm upgrade --install omega charts/omega -n "$NS" --create-namespace --wait \
    --set image.repository="$repo" --set image.tag="$tag" --set image.pullPolicy=IfNotPresent --set replicaCount=1
else
  python3 -c 'import helm_python' 2>/dev/null || skip "neither helm nor helm-python-sdk found"
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
  kubectl apply --server-side -f crds/
  # The CRDs were applied just above; NOTES.txt is no manifest.
  python3 charts/omega/ci/render.py charts/omega "{\"image\":{\"repository\":\"$repo\",\"tag\":\"$tag\"},\"replicaCount\":1,\"crds\":{\"install\":false}}" \
    | python3 -c 'import json,sys; print("\n---\n".join(v for k, v in json.load(sys.stdin)["manifests"].items() if k.endswith(".yaml")))' \
    | kubectl apply -n "$NS" -f -
  kubectl -n "$NS" rollout status deploy/omega-operator --timeout=180s
fi

kubectl apply -f e2e/k8s/shard.yaml
kubectl wait shard/e2e --for=condition=Ready --timeout=600s
kubectl get shard e2e -o wide
kubectl apply -f e2e/k8s/round.yaml
kubectl wait federationround/e2e-round --for=jsonpath='{.status.phase}'=Succeeded --timeout=600s
kubectl get federationround e2e-round -o jsonpath='{.status.message}{"\n"}'

kubectl delete -f e2e/k8s/shard.yaml --timeout=300s
for kind in statefulsets services poddisruptionbudgets networkpolicies; do
  left=$(kubectl get "$kind" -l omega.exogenesis.io/shard=e2e -o name | wc -l)
  [[ "$left" == 0 ]] || { echo "e2e/k8s: $kind left behind after deleting the Shard" >&2; exit 1; }
done
echo "e2e/k8s: passed"
