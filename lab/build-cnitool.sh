#!/usr/bin/env bash
# Build libcni's own `cnitool` (the reference CNI client) offline from Debian's
# golang-github-appc-cni source package, against the libcni that
# golang-github-appc-cni-dev installs. The lab's pods are created with it, the
# way a container runtime drives a CNI plugin (conflist from NETCONFPATH,
# CNI_PATH, results cached under /var/lib/cni by libcni).
#
# The source package is fetched through a private apt source list: the
# machine's own apt configuration is left alone.
#
#   lab/build-cnitool.sh OUTPUT
set -euo pipefail

out=${1:?usage: build-cnitool.sh OUTPUT}
package=golang-github-appc-cni
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

version=$(dpkg-query -W -f='${Version}' golang-github-appc-cni-dev)
mkdir -p "$work/lists/partial" "$work/src"
echo "deb-src http://deb.debian.org/debian bookworm main" > "$work/sources.list"
apt_opts=(-q -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update >/dev/null
(cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only "$package=$version" >/dev/null)
tar -xf "$work"/src/"${package}"_*.orig.tar.* -C "$work/src"
srcdir=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name "${package}-*" | head -1)
[ -f "$srcdir/cnitool/cnitool.go" ] || { echo "build-cnitool: no cnitool/ in $package $version" >&2; exit 1; }

mkdir -p "$(dirname "$out")"
(cd "$srcdir" && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$work/gocache" \
    go build -o "$out.tmp" ./cnitool)
mv "$out.tmp" "$out"
echo "build-cnitool: $out from $package $version"
