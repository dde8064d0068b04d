package istiocheck

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/credentialfetcher"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	pkiutil "istio.io/istio/security/pkg/pki/util"
)

// TestIssueWorkloadCert asks a running istiod for a workload certificate exactly as istio-agent
// does: a key and CSR from pkiutil.GenCSR with the identity as the only SAN
// (security/pkg/nodeagent/cache/secretcache.go generateNewSecret), sent by Istio's own CA client
// (security/pkg/nodeagent/caclient/providers/citadel CSRSign = IstioCertificateService/CreateCertificate)
// over TLS to istiod's secure gRPC port, authenticated with a Kubernetes ServiceAccount token that
// istiod checks by TokenReview (the JWT credential fetcher, security/pkg/credentialfetcher).
//
// Environment: MESHBRIDGE_ISTIOD_ADDR (host:port of istiod's secureGRPCAddr), MESHBRIDGE_ISTIOD_ROOTS
// (PEM file: the roots that verify istiod's serving certificate, i.e. its trust bundle),
// MESHBRIDGE_ISTIOD_TOKEN (file with the ServiceAccount token, audience istio-ca),
// MESHBRIDGE_ISTIOD_IDENTITY (spiffe://<td>/ns/<ns>/sa/<sa>), MESHBRIDGE_ISTIOD_TTL (seconds, default
// 3600), MESHBRIDGE_ISTIOD_OUT (directory: key.pem, cert-chain.pem = leaf + istiod's chain as
// returned, which with a plugged-in CA ends with cacerts' cert-chain.pem; root-cert.pem = the last
// element, istiod's whole trust bundle).
func TestIssueWorkloadCert(t *testing.T) {
	addr := os.Getenv("MESHBRIDGE_ISTIOD_ADDR")
	roots := os.Getenv("MESHBRIDGE_ISTIOD_ROOTS")
	token := os.Getenv("MESHBRIDGE_ISTIOD_TOKEN")
	identity := os.Getenv("MESHBRIDGE_ISTIOD_IDENTITY")
	out := os.Getenv("MESHBRIDGE_ISTIOD_OUT")
	if addr == "" || roots == "" || token == "" || identity == "" || out == "" {
		t.Fatal("set MESHBRIDGE_ISTIOD_ADDR, _ROOTS, _TOKEN, _IDENTITY and _OUT")
	}
	ttl, err := strconv.ParseInt(envOr("MESHBRIDGE_ISTIOD_TTL", "3600"), 10, 64)
	if err != nil {
		t.Fatalf("MESHBRIDGE_ISTIOD_TTL: %v", err)
	}
	fetcher, err := credentialfetcher.NewCredFetcher(security.JWT, "", token, "")
	if err != nil {
		t.Fatal(err)
	}
	opts := &security.Options{
		CAEndpoint:    addr,
		CAEndpointSAN: envOr("MESHBRIDGE_ISTIOD_SAN", "istiod.istio-system.svc"),
		ClusterID:     envOr("MESHBRIDGE_ISTIOD_CLUSTER_ID", "Kubernetes"),
		CredFetcher:   fetcher,
	}
	client, err := citadel.NewCitadelClient(opts, &citadel.TLSOptions{RootCert: roots})
	if err != nil {
		t.Fatalf("CA client for %s: %v", addr, err)
	}
	defer client.Close()

	csr, key, err := pkiutil.GenCSR(pkiutil.CertOptions{
		Host:     identity,
		ECSigAlg: pkiutil.EcdsaSigAlg,
		ECCCurve: pkiutil.P256Curve,
	})
	if err != nil {
		t.Fatal(err)
	}
	chain, err := client.CSRSign(csr, ttl)
	if err != nil {
		t.Fatalf("CreateCertificate for %s: %v", identity, err)
	}
	// istiod answers the leaf, its signing chain one certificate per element, then its root bundle as
	// the last element (security/pkg/server/ca/server.go CreateCertificate).
	leafAndChain := strings.Join(chain[:len(chain)-1], "")
	files := map[string]string{
		"key.pem":        string(key),
		"cert-chain.pem": leafAndChain,
		"root-cert.pem":  chain[len(chain)-1],
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(out, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("istiod issued %s: %d certificates in the answer", identity, len(chain))
}
