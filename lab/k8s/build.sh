#!/usr/bin/env bash
# Builds the upstream programs the lab cluster and the conformance run use, from source through the Go module
# proxy (no registry here serves Kubernetes release binaries), into a cache outside the checkout that every later
# run on this machine reuses: $SLUICE_K8S_CACHE/<version>/bin. A program is rebuilt only when its pins change.
#   lab/k8s/build.sh            everything
#   lab/k8s/build.sh --print    the bin directory (nothing is built)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
K8S_VERSION=v1.34.4
CACHE=${SLUICE_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/k8s}
BIN=$CACHE/$K8S_VERSION/bin
if [[ ${1-} == --print ]]; then echo "$BIN"; exit 0; fi

export PATH=/usr/local/go/bin:$PATH GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
mkdir -p "$BIN"

# kubelet, the apiserver and e2e.test compare versions (skew checks, e2e's own version gate): stamp the release
# the way upstream's hack/lib/version.sh does.
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1980-01-01T00:00:00Z"
done

# build NAME MODULE_DIR KIND PACKAGE: KIND is "cmd" (go build) or "test" (go test -c).
build() {
  local name=$1 dir=$2 kind=$3 pkg=$4
  local key
  key=$( (cat "$dir/go.mod" "$dir/go.sum"; echo "$kind $pkg $ldflags") | sha256sum | cut -c1-16)
  if [[ -x $BIN/$name && $(cat "$BIN/.$name.key" 2>/dev/null) == "$key" ]]; then return; fi
  echo "building $name ($pkg)"
  local start=$SECONDS
  if [[ $kind == cmd ]]; then
    (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$BIN/$name.tmp" "$pkg")
  else
    (cd "$dir" && go test -c -trimpath -ldflags "$ldflags" -o "$BIN/$name.tmp" "$pkg")
  fi
  mv "$BIN/$name.tmp" "$BIN/$name"
  echo "$key" > "$BIN/.$name.key"
  echo "built $name in $((SECONDS - start)) s"
}

k=$here/kubernetes
build kubectl                 "$k" cmd  k8s.io/kubernetes/cmd/kubectl
build kube-apiserver          "$k" cmd  k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager "$k" cmd  k8s.io/kubernetes/cmd/kube-controller-manager
build kube-scheduler          "$k" cmd  k8s.io/kubernetes/cmd/kube-scheduler
build kubelet                 "$k" cmd  k8s.io/kubernetes/cmd/kubelet
build kube-proxy              "$k" cmd  k8s.io/kubernetes/cmd/kube-proxy
build agnhost                 "$k" cmd  k8s.io/kubernetes/test/images/agnhost
build ginkgo                  "$k" cmd  github.com/onsi/ginkgo/v2/ginkgo
build e2e.test                "$k" test k8s.io/kubernetes/test/e2e
build crictl     "$here/cri-tools" cmd  sigs.k8s.io/cri-tools/cmd/crictl
build coredns    "$here/coredns"   cmd  github.com/coredns/coredns

# The pod sandbox's pause, from the same module's C source, static as upstream builds it.
pause_src=$(cd "$k" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
if [[ ! -x $BIN/pause || $(cat "$BIN/.pause.key" 2>/dev/null) != "$K8S_VERSION" ]]; then
  gcc -Os -Wall -Werror -static -DVERSION="$K8S_VERSION" -o "$BIN/pause" "$pause_src"
  echo "$K8S_VERSION" > "$BIN/.pause.key"
fi
echo "$BIN"
