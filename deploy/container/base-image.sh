#!/usr/bin/env bash
# The base image without a registry: Debian bookworm (debootstrap, minbase) with
# python3 and python3-venv, imported into the local Docker engine.
#
#   deploy/container/base-image.sh [TAG]     (default streamlstm-base:bookworm)
#
# Cached: nothing is done when TAG exists already (STREAMLSTM_BASE_REBUILD=1 rebuilds).
# Build the serving image on it with `--build-arg PYTHON_IMAGE=TAG` (deploy/README.md);
# without that argument the Dockerfile uses the official python image.
# Needs root, debootstrap and a Docker engine (deploy/container/dockerd.sh start).
# The mirror: $STREAMLSTM_DEBIAN_MIRROR (default http://deb.debian.org/debian).
#
# The certificate authorities this machine adds to Debian's (the *.crt files in
# /usr/local/share/ca-certificates, e.g. a TLS-intercepting proxy's) are added to the
# image's store too, and pip reads that store (/etc/pip.conf) rather than its own
# bundle: the image builds where this machine can reach PyPI. None: Debian's store.
set -euo pipefail

TAG=${1:-streamlstm-base:bookworm}
SUITE=bookworm
MIRROR=${STREAMLSTM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${MIRROR%/debian}/debian-security

if [[ ${STREAMLSTM_BASE_REBUILD:-0} != 1 ]] && docker image inspect "$TAG" > /dev/null 2>&1; then
  echo "base-image.sh: $TAG exists ($(docker image inspect -f '{{.Size}}' "$TAG") bytes); not rebuilt"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "base-image.sh: debootstrap needs root" >&2
  exit 1
fi
command -v debootstrap > /dev/null || {
  echo "base-image.sh: no debootstrap (deploy/container/dockerd.sh start installs it)" >&2
  exit 1
}

work=$(mktemp -d /var/tmp/streamlstm-base.XXXXXX)
root=$work/root
cleanup() {
  # A chroot's mounts first, so that rm never descends into the host's /proc.
  umount "$root/proc" 2> /dev/null || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

started=$SECONDS
echo "base-image.sh: debootstrap --variant=minbase $SUITE (python3, python3-venv, ca-certificates) from $MIRROR"
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$root" "$MIRROR" > "$work/debootstrap.log" 2>&1; then
  echo "base-image.sh: debootstrap failed; its log ends:" >&2
  tail -n 30 "$work/debootstrap.log" >&2
  tail -n 30 "$root/debootstrap/debootstrap.log" >&2 2> /dev/null || true
  exit 1
fi

# The point releases and security updates too, as the official images have them.
cat > "$root/etc/apt/sources.list" << SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES
shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob
if ((${#local_cas[@]})); then
  echo "base-image.sh: adding this machine's CAs: ${local_cas[*]##*/}"
  cp "${local_cas[@]}" "$root/usr/local/share/ca-certificates/"
fi
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"
if ! chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
  'apt-get update && apt-get upgrade -y && apt-get clean && update-ca-certificates' \
  > "$work/upgrade.log" 2>&1; then
  echo "base-image.sh: apt-get upgrade in the new root failed; its log ends:" >&2
  tail -n 30 "$work/upgrade.log" >&2
  exit 1
fi
umount "$root/proc"

# What an image does not need: apt's lists and caches, documentation (copyrights
# kept), the resolver and host names of this machine (Docker provides its own).
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/var/log/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/tmp/* \
  "$root"/etc/resolv.conf "$root"/etc/hostname
find "$root/usr/share/doc" -mindepth 2 ! -name copyright -delete 2> /dev/null || true
# apt in an image, as Docker's debian images have it: no recommends, and no package
# cache or downloaded .deb left in a layer (the caches alone are some 80 MB).
cat > "$root/etc/apt/apt.conf.d/90streamlstm" << 'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT
chroot "$root" python3 -c 'import venv, ensurepip' || {
  echo "base-image.sh: the new root's python3 has no venv/ensurepip" >&2
  exit 1
}

tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $SUITE + python3 python3-venv ($MIRROR)" \
  - "$TAG" > /dev/null
echo "base-image.sh: $TAG imported ($(docker image inspect -f '{{.Size}}' "$TAG") bytes) in $((SECONDS - started))s"
