// Package istiocheck holds Go tests that check meshbridge's output with Istio's own code:
// TestCacertsBundle (istiod's plugged-in CA checks on a cacerts directory) and TestSimulation
// (xDS built by istiod's config generator for two clusters' rendered objects, one hop at a time).
// scripts/testbin.sh prebuilds them with `go test -c`; tests/e2e/gocheck.py runs that binary.
package istiocheck
