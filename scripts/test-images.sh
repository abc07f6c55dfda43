#!/usr/bin/env bash
# Tests of the container images, on what this machine can run (no container
# runtime can: crun cannot set rlimits or cgroups here). Builds them with
# scripts/images.sh, then for each image:
#   - its config, read from the OCI archive with skopeo (what `skopeo copy`
#     and `podman load` read): entrypoint, a non-root user, the OCI labels
#     (source, revision = HEAD, version), linux/amd64, one layer; and its
#     size as a registry stores it and a node pulls it, compressed (<= 20 MB);
#   - its root filesystem mounted (buildah mount) and its binary run with
#     chroot as the image's user: `--version` names the version;
#   - the federation started from its image and answering on loopback: /ready
#     on its admin port, `meshctl status` over TLS from meshctl's image (the
#     first admin's configuration the federation wrote), and the injection
#     webhook over HTTPS with an AdmissionReview;
#   - the capture init container's own command (the chart's, rendered), run
#     with the agent image's sh and iptables in a network namespace made
#     here: the rules are in place;
# and the Helm chart and the kustomize base and overlays (as rendered by
# scripts/validate-deploy.sh) reference exactly the names and tags built.
#
# Needs root (buildah, chroot, ip netns). Without root, or with
# FEDMESH_SKIP_ROOT_TESTS=1 and no root, it says so and skips. Cleans up
# what it starts and makes: processes by PID, containers, the namespace.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== container images: built, configured, run from their root filesystems"
if [ "$(id -u)" -ne 0 ]; then
  if [ "${FEDMESH_SKIP_ROOT_TESTS:-}" = 1 ]; then
    echo "  skipped: not root (FEDMESH_SKIP_ROOT_TESTS=1)"
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
  fi
  echo "test-images.sh: needs root (buildah, chroot, ip netns); set FEDMESH_SKIP_ROOT_TESTS=1 to skip" >&2
  exit 1
fi
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
out=${FEDMESH_IMAGES_OUT:-target/images}
rendered=target/deploy-validate/rendered
# The chart as it is now (scripts/test.sh has just rendered it).
[ "${FEDMESH_RENDERED_FRESH:-}" = 1 ] || bash scripts/validate-deploy.sh
py=target/deploy-validate/python
limit=20000000

bash scripts/images.sh
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
revision=$(git rev-parse HEAD)
registry=${FEDMESH_IMAGE_REGISTRY:-ghcr.io/fedmesh}
source_url=$(sed -n 's/^home: //p' deploy/helm/fedmesh/Chart.yaml)

pass=0
fail=0
ok() { echo "  ok   $*"; pass=$((pass + 1)); }
bad() { echo "  FAIL $*" >&2; fail=$((fail + 1)); }

containers=()
pids=()
mounts=()
ns=fmimg$$
work=$(mktemp -d)
cleanup() {
  local p c m
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done
  for c in "${containers[@]}"; do
    buildah umount "$c" >/dev/null 2>&1 || true
    buildah rm "$c" >/dev/null 2>&1 || true
  done
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

declare -A mnt user bin_of
bin_for() { case $1 in meshctl) echo meshctl ;; *) echo "$1" ;; esac; }

echo "-- each image's config, size and binary"
while read -r name ref archive size; do
  bin=$(bin_for "$name")
  bin_of[$name]=$bin
  config=$(skopeo inspect --config "oci-archive:$archive")
  inspect=$(skopeo inspect "oci-archive:$archive")
  if why=$(python3 - "$config" "$inspect" "$bin" "$revision" "$version" "$source_url" "$name" <<'EOF'
import json, sys
config, inspect = json.loads(sys.argv[1]), json.loads(sys.argv[2])
binary, revision, version, source, name = sys.argv[3:8]
c = config["config"]
problems = []
if c.get("Entrypoint") != [f"/usr/local/bin/{binary}"]:
    problems.append(f"entrypoint {c.get('Entrypoint')}")
uid = c.get("User", "").split(":")[0]
if uid in ("", "0", "root"):
    problems.append(f"runs as root (User {c.get('User')!r})")
labels = c.get("Labels") or {}
want = {
    "org.opencontainers.image.source": source,
    "org.opencontainers.image.revision": revision,
    "org.opencontainers.image.version": version,
    "org.opencontainers.image.title": name,
}
for k, v in want.items():
    if labels.get(k) != v:
        problems.append(f"label {k}={labels.get(k)!r}, want {v!r}")
if (config.get("os"), config.get("architecture")) != ("linux", "amd64"):
    problems.append(f"platform {config.get('os')}/{config.get('architecture')}")
if len(inspect.get("Layers", [])) != 1:
    problems.append(f"{len(inspect.get('Layers', []))} layers, want 1 (from scratch)")
print("; ".join(problems) if problems else c["User"])
sys.exit(1 if problems else 0)
EOF
  ); then
    user[$name]=$why
    ok "$name: entrypoint /usr/local/bin/$bin, user $why, labels (revision ${revision:0:12}, version $version), one layer"
  else
    bad "$name: $why"
    continue
  fi
  # The image's size as a registry stores it and a node pulls it: its
  # compressed layer (the archive holds it with the config and manifest).
  if tar -xOf "$archive" index.json | python3 -c '
import json, sys
d = json.load(sys.stdin)["manifests"]
a = d[0].get("annotations", {})
sys.exit(0 if len(d) == 1 and a.get("io.containerd.image.name") == a.get("org.opencontainers.image.ref.name") == sys.argv[1] else 1)' "$ref"; then
    ok "$name: the archive names $ref for skopeo and podman (ref.name) and for ctr import and docker load (io.containerd.image.name)"
  else
    bad "$name: the archive's index.json does not name $ref for every loader"
  fi
  archive_size=$(stat -c %s "$archive")
  mb() { awk -v s="$1" 'BEGIN { printf "%.1f", s / 1e6 }'; }
  if [ "$archive_size" -le "$limit" ]; then
    ok "$name: $(mb "$archive_size") MB compressed (<= 20 MB; $(mb "$size") MB unpacked)"
  else
    bad "$name: $(mb "$archive_size") MB compressed, over 20 MB ($(mb "$size") MB unpacked)"
  fi
  # What `skopeo copy oci-archive:... docker://REGISTRY/...` does, to a
  # local OCI layout (no registry runs here): the manifest survives intact.
  if skopeo copy --quiet "oci-archive:$archive" "oci:$work/layout:$name" \
    && [ "$(skopeo inspect --format '{{.Digest}}' "oci:$work/layout:$name")" = "$(skopeo inspect --format '{{.Digest}}' "oci-archive:$archive")" ]; then
    ok "$name: skopeo copies the archive with its manifest digest unchanged"
  else
    bad "$name: skopeo copy of $archive failed or changed the manifest"
  fi
  c=$(buildah from --quiet "oci-archive:$archive")
  containers+=("$c")
  mnt[$name]=$(buildah mount "$c")
  got=$(chroot --userspec="${user[$name]}" "${mnt[$name]}" "/usr/local/bin/$bin" --version 2>&1) || true
  if [ "$got" = "$bin $version" ]; then
    ok "$name: '$bin --version' from the image as ${user[$name]}: $got"
  else
    bad "$name: '$bin --version' printed: $got"
  fi
done < "$out/images.txt"

echo "-- the federation, started from its image"
fed=${mnt[fedmesh-federation]}
ctl=${mnt[meshctl]}
api=$(free_port)
admin=$(free_port)
hook=$(free_port)
svc=fedmesh-federation.fedmesh-system.svc
PYTHONPATH=$py python3 -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "fedmesh-sidecar-injector":
        sys.stdout.write(d["data"]["patch.yaml"])' "$rendered/helm-example.yaml" > "$fed/tmp/sidecar.yaml"
chroot --userspec="${user[fedmesh-federation]}" "$fed" /usr/local/bin/fedmesh-federation \
  --listen "127.0.0.1:$api" --admin "127.0.0.1:$admin" --registry memory \
  --bootstrap-admin /tmp/admin.yaml --advertise-url "https://127.0.0.1:$api" --tls-san "$svc" \
  --inject-listen "127.0.0.1:$hook" --inject-template /tmp/sidecar.yaml > "$work/federation.log" 2>&1 &
pids+=($!)
ready=""
for _ in $(seq 150); do
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin/ready")" = 200 ]; then ready=1; break; fi
  kill -0 "${pids[0]}" 2>/dev/null || break
  sleep 0.2
done
if [ -n "$ready" ]; then
  ok "fedmesh-federation from its image: /ready answers 200 on 127.0.0.1:$admin"
else
  bad "fedmesh-federation from its image never became ready:"; cat "$work/federation.log" >&2
fi
cp "$fed/tmp/admin.yaml" "$ctl/tmp/admin.yaml"
chown "${user[meshctl]}" "$ctl/tmp/admin.yaml"
if status=$(env FEDMESH_CONFIG=/tmp/admin.yaml chroot --userspec="${user[meshctl]}" "$ctl" \
    /usr/local/bin/meshctl status 2>&1) && grep -q "^registry   memory" <<<"$status"; then
  ok "meshctl from its image: 'meshctl status' over TLS as the first admin: $(grep '^registry' <<<"$status")"
else
  bad "meshctl status from its image: $status"
fi
python3 -c '
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"certificate-authority-data: \|\n((?:\s+.*\n)+?)\s*client-certificate-data", text)
print("\n".join(l.strip() for l in m.group(1).splitlines()))' "$fed/tmp/admin.yaml" > "$work/root.pem"
answer=$(curl -sS --max-time 10 --cacert "$work/root.pem" --resolve "$svc:$hook:127.0.0.1" \
  -H 'Content-Type: application/json' --data-binary @federation/tests/fixtures/admission/replicaset-pod.json \
  "https://$svc:$hook/inject" 2>&1) || true
if grep -q '"patchType":"JSONPatch"' <<<"$answer"; then
  ok "the injection webhook from the image answers an AdmissionReview over HTTPS (certificate checked for $svc)"
else
  bad "the injection webhook from the image: $answer"
fi

echo "-- the capture init container, with the agent image's sh and iptables"
rules=$(PYTHONPATH=$py python3 -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "reviews":
        init = d["spec"]["template"]["spec"]["initContainers"][0]
        assert init["command"][:2] == ["sh", "-c"], init["command"]
        print(init["command"][2])' "$rendered/helm-example.yaml")
# As the chart runs it: a read-only root filesystem, root with only the
# capabilities it adds (NET_ADMIN, NET_RAW; and SYS_CHROOT, for this
# test's chroot into the image).
ip netns add "$ns"
ro="$work/agent-ro"
mkdir -p "$ro"
mount --bind "${mnt[fedmesh-agent]}" "$ro"
mounts+=("$ro")
mount -o remount,bind,ro "$ro"
if env APP_PORT=9080 PATH=/usr/local/bin:/usr/sbin:/bin ip netns exec "$ns" \
    setpriv --bounding-set=-all,+net_admin,+net_raw,+sys_chroot --inh-caps=-all \
    chroot "$ro" sh -c "$rules" > "$work/init.log" 2>&1; then
  got=$(ip netns exec "$ns" iptables -t nat -S)
  if grep -q -- "-A OUTPUT -p tcp -m owner --uid-owner 1337 -j RETURN" <<<"$got" \
    && grep -q -- "-A OUTPUT -p tcp -j REDIRECT --to-ports 15001" <<<"$got" \
    && grep -q -- "-A FEDMESH_INBOUND -p tcp -m tcp --dport 9080 -j REDIRECT --to-ports 15006" <<<"$got"; then
    ok "the chart's capture rules ran with the agent image's sh and iptables (read-only root, NET_ADMIN and NET_RAW only): outbound to 15001 (uid 1337 excluded), port 9080 to 15006"
  else
    bad "the capture rules are not in place: $got"
  fi
else
  bad "the capture init command failed in the agent image: $(cat "$work/init.log")"
fi

echo "-- the chart and kustomize reference what was built"
built=$(awk '{ print $1 }' "$out/images.txt" | tr '\n' ' ')
revtag=$(awk 'NR == 1 { print $2 }' "$out/images.txt")
revtag=${revtag##*:}
PYTHONPATH=$py python3 scripts/deploy_render.py helm deploy/helm/fedmesh "$work/rev.yaml" \
  --values deploy/helm/fedmesh/ci/example-values.yaml --set-json "{\"image\": {\"tag\": \"$revtag\"}}" >/dev/null
if why=$(PYTHONPATH=$py python3 - "$registry" "$version" "$out/images.txt" "$work/rev.yaml" \
    "$rendered"/helm-default.yaml "$rendered"/helm-etcd-tls.yaml "$rendered"/helm-example.yaml \
    "$rendered"/kustomize-*.yaml <<'EOF'
import sys, yaml
registry, version, listing, rev_file, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
built = {}
for line in open(listing):
    name, ref = line.split()[:2]
    built[name] = ref
def images(path):
    out = set()
    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "image" and isinstance(v, str):
                    out.add(v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    for d in yaml.safe_load_all(open(path)):
        walk(d)
    return {i for i in out if i.startswith(registry + "/")}
problems, seen = [], set()
tagged = {f"{registry}/{n}:{version}" for n in built}
for f in files:
    for ref in images(f):
        seen.add(ref)
        if ref not in tagged:
            problems.append(f"{f} references {ref}, which images.sh does not build")
for n in ("fedmesh-federation", "fedmesh-gateway", "fedmesh-agent"):
    if f"{registry}/{n}:{version}" not in seen:
        problems.append(f"no manifest references {registry}/{n}:{version}")
rev = images(rev_file)
want = {built[n] for n in ("fedmesh-federation", "fedmesh-gateway", "fedmesh-agent")}
if rev != want:
    problems.append(f"the chart with image.tag=VERSION-REV references {sorted(rev)}, want {sorted(want)}")
print("; ".join(problems) if problems else f"{len(seen)} references in {len(files)} manifests; the VERSION-REV tag too")
sys.exit(1 if problems else 0)
EOF
); then
  ok "chart and kustomize reference exactly the built images ($built): $why"
else
  bad "$why"
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
