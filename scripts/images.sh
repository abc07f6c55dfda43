#!/usr/bin/env bash
# Builds fedmesh's container images offline with buildah, from scratch, and
# saves each as an OCI archive that `podman load`, `docker load` (25+) and
# `skopeo copy oci-archive:...` take:
#
#   fedmesh-federation  the control plane (and the sidecar-injection webhook)
#   fedmesh-gateway     the east-west gateway
#   fedmesh-agent       the sidecar, and its capture init container
#                       (busybox's sh and iptables, nft and legacy backends)
#   meshctl             the operator's CLI
#
# Each holds its release binary (stripped) and exactly the shared libraries
# it loads (ldd: glibc's loader, libc, libm, libgcc_s), /etc/passwd and
# /etc/group naming its non-root user, and nothing else; the federation's
# also busybox's `cat` and `sh` (kubectl exec ... cat of the first admin's
# configuration). No base image, no package manager, no network.
#
# Tags: the chart's appVersion (the workspace version, what the Helm chart
# and the kustomize base reference) and VERSION-REV, REV the git revision
# (12 hex digits; "-dirty" when the work tree has changes). OCI labels:
# org.opencontainers.image.{source,revision,version,title,description,
# licenses,created} (created: the commit's time, so a rebuild of one
# revision gives the same config).
#
#   scripts/images.sh               build the binaries, then the images
#   FEDMESH_IMAGES_OUT=DIR          where the archives go (target/images)
#   FEDMESH_IMAGE_REGISTRY=REG      name prefix (ghcr.io/fedmesh)
#   FEDMESH_IMAGES_SKIP_BUILD=1     use target/release's binaries as they are
#
# Writes DIR/images.txt: one line per image, "NAME REF ARCHIVE SIZE" (SIZE:
# the uncompressed root filesystem in bytes). Needs root (buildah's storage
# under /var/lib/containers), buildah, busybox-static and iptables
# (scripts/deps.sh installs them). Uses the vfs storage driver: no overlay
# mounts needed.
set -euo pipefail
cd "$(dirname "$0")/.."

registry=${FEDMESH_IMAGE_REGISTRY:-ghcr.io/fedmesh}
out=${FEDMESH_IMAGES_OUT:-target/images}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

for tool in buildah strip ldd git; do
  command -v "$tool" >/dev/null || { echo "images.sh: $tool not found (scripts/deps.sh installs it)" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "images.sh: needs root (buildah's storage)" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "images.sh: /bin/busybox (busybox-static) not found" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
chart_version=$(sed -n 's/^appVersion: "\(.*\)"$/\1/p' deploy/helm/fedmesh/Chart.yaml)
if [ "$version" != "$chart_version" ]; then
  echo "images.sh: the workspace version $version is not the chart's appVersion $chart_version" >&2
  exit 1
fi
revision=$(git rev-parse HEAD)
rev=${revision:0:12}
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  rev="$rev-dirty"
fi
created=$(date -u -d "@$(git log -1 --format=%ct)" +%Y-%m-%dT%H:%M:%SZ)
source_url=$(sed -n 's/^home: //p' deploy/helm/fedmesh/Chart.yaml)

echo "== images $registry/*:$version and :$version-$rev (revision $revision)"
echo "-- release binaries"
if [ "${FEDMESH_IMAGES_SKIP_BUILD:-}" = 1 ]; then
  echo "  FEDMESH_IMAGES_SKIP_BUILD=1: the binaries in target/release as they are"
else
  cargo build --release --locked -p federation -p gateway -p mesh-agent -p meshctl
fi

mkdir -p "$out"
rm -f "$out"/*.tar "$out/images.txt"
stage=$(mktemp -d)
ctr=""
# A build that fails half-way leaves no working container (under vfs, a
# full copy of the image) behind.
trap 'rm -rf "$stage"; [ -z "$ctr" ] || buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT

# Copies FILE into ROOT at the same path, with the shared libraries it
# loads (and the loader), resolved through symlinks.
with_libs() {
  local root=$1 file=$2 lib
  while read -r lib; do
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(ldd "$file" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' | sort -u)
}

# ROOT USER UID: the files every image has.
base() {
  local root=$1 user=$2 uid=$3
  mkdir -p "$root/etc" "$root/usr/local/bin" "$root/tmp" "$root/run"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\n%s:x:%s:%s:%s:/nonexistent:/sbin/nologin\n' \
    "$user" "$uid" "$uid" "$user" > "$root/etc/passwd"
  printf 'root:x:0:\n%s:x:%s:\n' "$user" "$uid" > "$root/etc/group"
  printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
}

# ROOT BINARY: the stripped release binary and its libraries.
binary() {
  local root=$1 bin=$2
  strip -o "$root/usr/local/bin/$bin" "target/release/$bin"
  with_libs "$root" "target/release/$bin"
}

# ROOT APPLET...: busybox, and the applets as links to it.
busybox() {
  local root=$1 a
  shift
  mkdir -p "$root/bin"
  cp /bin/busybox "$root/bin/busybox"
  for a in "$@"; do ln -s busybox "$root/bin/$a"; done
}

# ROOT: iptables (xtables multi binaries, the nft backend as `iptables`,
# legacy as `iptables-legacy`) and the extensions the capture rules use.
iptables_tools() {
  local root=$1 multi t ext
  mkdir -p "$root/usr/sbin" "$root/usr/lib/x86_64-linux-gnu/xtables"
  for multi in xtables-nft-multi xtables-legacy-multi; do
    cp "/usr/sbin/$multi" "$root/usr/sbin/$multi"
    with_libs "$root" "/usr/sbin/$multi"
  done
  for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -s xtables-nft-multi "$root/usr/sbin/$t"
    ln -s xtables-legacy-multi "$root/usr/sbin/${t/tables/tables-legacy}"
  done
  # -p tcp, -d, -j RETURN/REDIRECT, -m owner, -N/-A: the standard target,
  # tcp and owner matches, REDIRECT (IPv4 and IPv6).
  for ext in libxt_standard libxt_tcp libxt_udp libxt_owner libxt_REDIRECT libipt_REDIRECT libip6t_REDIRECT \
             libxt_comment libxt_mark libxt_MARK libxt_multiport libxt_conntrack; do
    if [ -f "/usr/lib/x86_64-linux-gnu/xtables/$ext.so" ]; then
      cp "/usr/lib/x86_64-linux-gnu/xtables/$ext.so" "$root/usr/lib/x86_64-linux-gnu/xtables/"
      with_libs "$root" "/usr/lib/x86_64-linux-gnu/xtables/$ext.so"
    fi
  done
}

# ARCHIVE REF: names the image in the archive's index.json for the loaders
# too: org.opencontainers.image.ref.name (buildah's; skopeo and podman read
# it) and io.containerd.image.name (containerd's `ctr import` and
# `docker load`, which otherwise load it without a name).
name_archive() {
  python3 - "$1" "$2" <<'EOF'
import io, json, sys, tarfile
path, ref = sys.argv[1], sys.argv[2]
with tarfile.open(path) as t:
    members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]
with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
    for m, data in members:
        if m.name == "index.json":
            index = json.loads(data)
            for d in index["manifests"]:
                d.setdefault("annotations", {})["io.containerd.image.name"] = ref
            data = json.dumps(index, separators=(",", ":")).encode()
            m.size = len(data)
        t.addfile(m, io.BytesIO(data) if data is not None else None)
EOF
}

# NAME BIN USER UID DESCRIPTION: builds, tags and saves one image.
image() {
  local name=$1 bin=$2 user=$3 uid=$4 description=$5 root="$stage/$1"
  local ref="$registry/$name:$version" rev_ref="$registry/$name:$version-$rev"
  mkdir -p "$root"
  base "$root" "$user" "$uid"
  binary "$root" "$bin"
  case $name in
    fedmesh-agent) busybox "$root" sh; iptables_tools "$root" ;;
    fedmesh-federation) busybox "$root" sh cat ;;
  esac
  local size
  size=$(du -sb --apparent-size "$root" | cut -f1)
  # Earlier builds of this image leave the local storage.
  buildah images --noheading --format '{{.ID}}' --filter "reference=$registry/$name" \
    | sort -u | xargs -r buildah rmi -f >/dev/null 2>&1 || true
  ctr=$(buildah from scratch)
  buildah copy --quiet "$ctr" "$root" / >/dev/null
  buildah config \
    --entrypoint "[\"/usr/local/bin/$bin\"]" --cmd '' \
    --user "$uid:$uid" --workingdir / \
    --env PATH=/usr/local/bin:/usr/sbin:/bin \
    --label "org.opencontainers.image.source=$source_url" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.title=$name" \
    --label "org.opencontainers.image.description=$description" \
    --label "org.opencontainers.image.licenses=Apache-2.0" \
    --label "org.opencontainers.image.created=$created" \
    "$ctr"
  buildah commit --quiet --format oci --timestamp "$(git log -1 --format=%ct)" --rm "$ctr" "$rev_ref" >/dev/null
  ctr=""
  buildah tag "$rev_ref" "$ref"
  local archive="$out/$name-$version-$rev.tar"
  buildah push --quiet "$rev_ref" "oci-archive:$archive:$rev_ref"
  name_archive "$archive" "$rev_ref"
  echo "$name $rev_ref $archive $size" >> "$out/images.txt"
  awk -v n="$name" -v r="$rev_ref" -v s="$size" -v a="$(stat -c %s "$archive")" \
    'BEGIN { printf "  %-20s %-56s %5.1f MB root filesystem, %5.1f MB archive\n", n, r, s / 1e6, a / 1e6 }'
}

echo "-- images"
image fedmesh-federation fedmesh-federation fedmesh 65532 "fedmesh control plane: global endpoint registry, config push, mesh CA, sidecar-injection webhook"
image fedmesh-gateway fedmesh-gateway fedmesh 65532 "fedmesh east-west gateway: SNI-routed mTLS passthrough"
image fedmesh-agent fedmesh-agent fedmesh-agent 1337 "fedmesh agent: the sidecar data plane, and its capture init container"
image meshctl meshctl meshctl 65532 "meshctl: the fedmesh operator's CLI"
echo "images in $out (list: $out/images.txt)"
