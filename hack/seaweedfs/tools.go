//go:build tools

// Package tools pins SeaweedFS' `weed` command, which hack/build-s3 compiles.
// The build tag keeps this file out of normal builds; `go mod tidy` still sees
// the import and keeps go.sum complete.
package tools

import (
	_ "github.com/seaweedfs/seaweedfs/weed"
)
