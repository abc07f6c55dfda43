#!/usr/bin/env bash
# Renders deploy/'s Helm chart and kustomize overlays with the real tools and
# validates every manifest offline; exits non-zero on any invalid one.
#
#   Helm:       helm-python-sdk (Helm's Go SDK, v4, in the wheel), with the
#               chart's values.schema.json and `helm lint --strict`.
#   kustomize:  the Go library in the pykustomize wheel (kustomize/api),
#               loaded with ctypes: the wheel's own Python wrapper asks for
#               Python >= 3.14, the library does not.
#   validation: kubernetes-validate (the Kubernetes OpenAPI schemas it ships)
#               for Kubernetes $K8S_VERSIONS, strict (unknown fields refused);
#               custom resources against their CRD's openAPIV3Schema
#               (jsonschema).
#
# Also: the kustomize base and us-east-1 overlay equal the chart rendered for
# the same cluster; the sidecar added to workloads is the injection template;
# and negative checks that the checks can fail. Python packages are pinned
# and installed under target/deploy-validate/ (nothing outside it); the
# second run reuses them. Needs python3 and pip, and PyPI the first time.
set -euo pipefail
cd "$(dirname "$0")/.."

# The oldest Kubernetes the chart accepts (Chart.yaml kubeVersion), a
# current one, and the newest kubernetes-validate 1.37.0 ships.
K8S_VERSIONS=${K8S_VERSIONS:-1.25,1.32,1.37}
work=target/deploy-validate
py="$work/python"
pins="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.3"
pykustomize=pykustomize==0.1.4
lib="$work/libpykustomize.so"

echo "== deploy manifests: Helm and kustomize rendered, validated offline (Kubernetes ${K8S_VERSIONS//,/, })"

if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "validate-deploy.sh: the Helm and kustomize libraries are fetched for Linux x86_64 only" >&2
  exit 1
fi
pip=(python3 -m pip)
# What is installed, with the Python it was installed for (compiled modules).
stamp="$pins $pykustomize python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$(cat "$py/.pins" 2>/dev/null)" != "$stamp" ] || [ ! -f "$lib" ]; then
  echo "installing $pins $pykustomize into $work"
  rm -rf "$py" "$lib"
  mkdir -p "$work"
  "${pip[@]}" install --quiet --disable-pip-version-check --root-user-action=ignore --no-cache-dir --target "$py" $pins
  # The wheel holds three identical copies of Helm's 85 MB library, by the
  # names a loader may look for; keep one.
  helm_lib="$py/helm_python/lib"
  for so in "$helm_lib"/libhelm_c.so "$helm_lib"/libhelm_c.so.0; do
    if [ -f "$so" ] && [ ! -L "$so" ] && cmp -s "$so" "$helm_lib/libhelm_c.so.0.2.2"; then
      ln -sf libhelm_c.so.0.2.2 "$so"
    fi
  done
  tmp=$(mktemp -d)
  "${pip[@]}" download --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    --only-binary=:all: --python-version 3.14 --platform any "$pykustomize" -d "$tmp"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("pykustomize/_lib/linux-amd64/libpykustomize.so", sys.argv[2])' \
    "$(ls "$tmp"/pykustomize-*.whl)" "$tmp"
  mv "$tmp/pykustomize/_lib/linux-amd64/libpykustomize.so" "$lib"
  rm -rf "$tmp"
  echo "$stamp" > "$py/.pins"
fi

out="$work/rendered"
rm -rf "$out"
mkdir -p "$out"
render() { PYTHONPATH="$py" python3 scripts/deploy_render.py "$@"; }
chart=deploy/helm/fedmesh

echo "-- Helm chart $chart"
for v in default etcd-tls example options install-us-east-1 install-eu-west-1; do
  render helm "$chart" "$out/helm-$v.yaml" --values "$chart/ci/$v-values.yaml"
done

echo "-- kustomize"
for k in base overlays/us-east-1 overlays/eu-west-1 overlays/example-app; do
  render kustomize "$lib" "$(pwd)/deploy/kustomize/$k" "$out/kustomize-${k##*/}.yaml"
done
# The without-istio-crds component, on the base, from a kustomization made here.
mix="$work/without-istio-crds"
rm -rf "$mix" && mkdir -p "$mix"
cat > "$mix/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../../../deploy/kustomize/base]
components: [../../../deploy/kustomize/components/without-istio-crds]
EOF
render kustomize "$lib" "$(pwd)/$mix" "$out/kustomize-without-istio-crds.yaml"
if grep -q "istio.io$" <(grep "^  name: " "$out/kustomize-without-istio-crds.yaml"); then
  echo "FAIL the without-istio-crds component left an Istio CRD in" >&2
  exit 1
fi

echo "-- validation against the Kubernetes ${K8S_VERSIONS//,/, } schemas (kubernetes-validate, strict) and the CRDs"
for f in "$out"/helm-*.yaml "$out"/kustomize-*.yaml deploy/kubernetes/*.yaml; do
  if [ "$f" = "$out/kustomize-example-app.yaml" ]; then
    # Its custom resources are checked against the base's CRDs.
    render validate "$K8S_VERSIONS" "$f" --crds "$out/kustomize-base.yaml"
  else
    render validate "$K8S_VERSIONS" "$f"
  fi
done

echo "-- the kustomize base and overlays against the chart"
render same "$out/kustomize-base.yaml" "$out/helm-default.yaml"
render same "$out/kustomize-us-east-1.yaml" "$out/helm-etcd-tls.yaml"
if ! grep -q "fedmesh.io/inject: enabled" "$out/helm-example.yaml"; then
  echo "FAIL the chart's example has no opted-in namespace" >&2
  exit 1
fi
render sidecar "$out/helm-example.yaml"
render sidecar "$out/helm-options.yaml"
render sidecar "$out/kustomize-example-app.yaml" "$out/kustomize-base.yaml"

echo "-- negative checks: each must be refused"
render helm "$chart" "$out/refused.yaml" --values "$chart/ci/default-values.yaml" \
  --set-json '{"federation": {"replicas": "two"}}' --expect-fail "/federation/replicas"
render helm "$chart" "$out/refused.yaml" --values "$chart/ci/default-values.yaml" \
  --set-json '{"etcd": {"endpoints": []}}' --expect-fail "/etcd/endpoints"
render break "$out/helm-default.yaml" "$out/broken-replicas.yaml" Deployment fedmesh-federation spec.replicas '"two"'
render validate "$K8S_VERSIONS" "$out/broken-replicas.yaml" --expect-invalid "Deployment/fedmesh-system/fedmesh-federation: spec.replicas"
render break "$out/kustomize-base.yaml" "$out/broken-selector.yaml" Deployment fedmesh-eastwest-gateway spec.selector DELETE
render validate "$K8S_VERSIONS" "$out/broken-selector.yaml" --expect-invalid "'selector' is a required property"
render break "$out/kustomize-base.yaml" "$out/broken-field.yaml" PodDisruptionBudget fedmesh-federation spec.maxUnavailabel 1
render validate "$K8S_VERSIONS" "$out/broken-field.yaml" --expect-invalid "maxUnavailabel"
render break "$out/kustomize-example-app.yaml" "$out/broken-cr.yaml" TrafficWeights reviews spec '"80/20"'
render validate "$K8S_VERSIONS" "$out/broken-cr.yaml" --crds "$out/kustomize-base.yaml" --expect-invalid "TrafficWeights/fedmesh-example/reviews"
render break "$out/helm-default.yaml" "$out/broken-crd.yaml" CustomResourceDefinition trafficweights.fedmesh.io spec.names.plural '"tws"'
render validate "$K8S_VERSIONS" "$out/broken-crd.yaml" --expect-invalid "metadata.name must be tws.fedmesh.io"
render break "$out/kustomize-example-app.yaml" "$out/broken-sidecar.yaml" Deployment reviews spec.template.metadata.annotations '{}'
if render sidecar "$out/broken-sidecar.yaml" "$out/kustomize-base.yaml" >/dev/null; then
  echo "FAIL a workload without fedmesh.io/app-port passed the sidecar check" >&2
  exit 1
fi
echo "  refused as expected: a sidecar workload without fedmesh.io/app-port"

echo "deploy manifests valid: rendered in $out"
