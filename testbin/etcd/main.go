// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3 whose own go.mod carries
// local replace directives (so `go install` of it fails). See testbin/versions.env.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
