//go:build tools

// Package tools pins the Kubernetes control-plane commands that
// hack/build-binaries compiles. The build tag keeps this file out of normal
// builds; `go mod tidy` still sees the imports and keeps go.sum complete.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
