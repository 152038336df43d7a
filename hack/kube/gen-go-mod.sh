#!/usr/bin/env bash
# Regenerate hack/kube/go.mod + go.sum for a Kubernetes release, e.g.
#   hack/kube/gen-go-mod.sh v1.34.4
# k8s.io/kubernetes replaces each staging module with ./staging/src/k8s.io/<name>;
# outside its repo those must point at the published k8s.io/<name> v0.<minor>.<patch>.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
version=${1:?usage: $0 v1.MINOR.PATCH}
staging=v0.${version#v1.}
export GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOFLAGS=-mod=mod
gomod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
[[ -s $gomod ]] || { echo "cannot download k8s.io/kubernetes@$version" >&2; exit 1; }
goline=$(awk '$1 == "go" { print; exit }' "$gomod")
{
  echo "module agentry.local/hack/kube"
  echo
  echo "$goline"
  echo
  echo "godebug default=go${goline#go }" | sed -E 's/(go[0-9]+\.[0-9]+)\.[0-9]+$/\1/'
  echo
  echo "require k8s.io/kubernetes $version"
  echo
  echo "replace ("
  sed -n -E "s#^[[:space:]]*(k8s.io/[a-z0-9-]+) => \./staging/src/k8s.io/[a-z0-9-]+[[:space:]]*\$#\t\1 => \1 $staging#p" "$gomod"
  echo ")"
} >go.mod
rm -f go.sum
go mod tidy
echo "hack/kube/go.mod now pins k8s.io/kubernetes $version (staging $staging)" >&2
