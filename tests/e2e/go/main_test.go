package istiocheck

import (
	"os"
	"testing"

	istiolog "istio.io/istio/pkg/log"
)

// TestMain quiets istiod's own logging (the fake discovery server logs every push at info level)
// unless MESHBRIDGE_GO_VERBOSE=1.
func TestMain(m *testing.M) {
	if os.Getenv("MESHBRIDGE_GO_VERBOSE") != "1" {
		for _, s := range istiolog.Scopes() {
			s.SetOutputLevel(istiolog.WarnLevel)
		}
	}
	os.Exit(m.Run())
}
