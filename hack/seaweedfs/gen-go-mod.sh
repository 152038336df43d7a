#!/usr/bin/env bash
# Regenerate hack/seaweedfs/go.mod + go.sum for a SeaweedFS version, e.g.
#   hack/seaweedfs/gen-go-mod.sh v0.0.0-20261109003541-7506e5f91cd6
# SeaweedFS' go.mod carries replace directives, so `go install .../weed@version` is refused;
# this wrapper module requires it and copies its (non-local) replace lines verbatim.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
version=${1:?usage: $0 <seaweedfs module version>}
export GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOFLAGS=-mod=mod
gomod=$(go mod download -json "github.com/seaweedfs/seaweedfs@$version" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
[[ -s $gomod ]] || { echo "cannot download github.com/seaweedfs/seaweedfs@$version" >&2; exit 1; }
goline=$(awk '$1 == "go" { print; exit }' "$gomod")
# replace lines, single-line form (`replace a => b v`) and block form (`replace ( ... )`)
replaces=$(awk '
  /^replace[[:space:]]*\(/ { inblock = 1; next }
  inblock && /^\)/ { inblock = 0; next }
  inblock { sub(/^[[:space:]]+/, ""); print; next }
  /^replace[[:space:]]/ { sub(/^replace[[:space:]]+/, ""); print }
' "$gomod")
if grep -E '=>[[:space:]]*\.' <<<"$replaces" >/dev/null; then
  echo "SeaweedFS $version replaces a module with a local path; adapt this script:" >&2
  grep -E '=>[[:space:]]*\.' <<<"$replaces" >&2
  exit 1
fi
{
  echo "module agentry.local/hack/seaweedfs"
  echo
  echo "$goline"
  echo
  echo "require github.com/seaweedfs/seaweedfs $version"
  if [[ -n $replaces ]]; then
    echo
    echo "replace ("
    sed 's/^/\t/' <<<"$replaces"
    echo ")"
  fi
} >go.mod
rm -f go.sum
go mod tidy
echo "hack/seaweedfs/go.mod now pins github.com/seaweedfs/seaweedfs $version" >&2
