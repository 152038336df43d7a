// Command etcd is a thin wrapper so etcd can be built from the Go module proxy
// (`go install go.etcd.io/etcd/...@version` is refused because etcd's own
// go.mod files carry replace directives).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
