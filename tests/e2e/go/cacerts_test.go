package istiocheck

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"istio.io/istio/security/pkg/pki/ca"
	"istio.io/istio/security/pkg/pki/util"
)

// TestCacertsBundle loads the directory named by MESHBRIDGE_CACERTS_DIR the way istiod loads its
// mounted `cacerts` Secret (plugged-in CA, istiod file layout) and runs istiod's own checks:
// util.Verify through ca.NewPluggedCertIstioCAOptions (chain to root-cert.pem, key parses and
// matches, CRL signed by every certificate of cert-chain.pem when ca-crl.pem exists, ca-cert.pem
// is a CA). It then lets the resulting Istio CA sign a workload certificate and verifies that chain
// with crypto/x509, as a peer would.
//
// With MESHBRIDGE_WORKLOAD_CERT (PEM: leaf first, then its chain) it also verifies that chain
// against root-cert.pem (ExtKeyUsageAny); MESHBRIDGE_EXPECT_FAIL=1 inverts that check, e.g. for a
// certificate whose URI SAN violates the intermediate's name constraints.
func TestCacertsBundle(t *testing.T) {
	dir := os.Getenv("MESHBRIDGE_CACERTS_DIR")
	if dir == "" {
		t.Skip("MESHBRIDGE_CACERTS_DIR not set")
	}
	file := func(name string) string { return filepath.Join(dir, name) }

	// The Secret layout istiod picks: tls.crt wins when present; istio-generated marks a self-signed CA.
	for _, bad := range []string{"tls.crt", "istio-generated"} {
		if _, err := os.Stat(file(bad)); err == nil {
			t.Errorf("%s: key %q present: istiod would not use the istiod-format files as a plugged-in CA", dir, bad)
		}
	}
	var missing []string
	for _, name := range []string{ca.CACertFile, ca.CAPrivateKeyFile, ca.CertChainFile, ca.RootCertFile} {
		if _, err := os.Stat(file(name)); err != nil {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		t.Fatalf("%s: incomplete signing CA bundle, missing %v (istiod >= 1.27 refuses to start)", dir, missing)
	}
	bundle := ca.SigningCAFileBundle{
		RootCertFile:    file(ca.RootCertFile),
		CertChainFiles:  []string{file(ca.CertChainFile)},
		SigningCertFile: file(ca.CACertFile),
		SigningKeyFile:  file(ca.CAPrivateKeyFile),
	}
	if _, err := os.Stat(file(ca.CACRLFile)); err == nil {
		bundle.CRLFile = file(ca.CACRLFile)
		t.Logf("CRL file %s present: istiod checks it", ca.CACRLFile)
	}

	opts, err := ca.NewPluggedCertIstioCAOptions(bundle, 24*time.Hour, 90*24*time.Hour, 2048)
	if err != nil {
		t.Fatalf("istiod would refuse this cacerts bundle: %v", err)
	}
	t.Logf("istiod accepts the bundle (util.Verify + CA check passed)")

	// Istio's own verification a second time, directly, so the error text is util.Verify's.
	if _, err := util.NewVerifiedKeyCertBundleFromFile(bundle.SigningCertFile, bundle.SigningKeyFile,
		bundle.CertChainFiles, bundle.RootCertFile, bundle.CRLFile); err != nil {
		t.Fatalf("util.NewVerifiedKeyCertBundleFromFile: %v", err)
	}

	caCert := firstCert(t, file(ca.CACertFile))
	chainCerts := readCerts(t, file(ca.CertChainFile))
	if len(chainCerts) == 0 || !chainCerts[0].Equal(caCert) {
		t.Errorf("cert-chain.pem must start with ca-cert.pem (it is appended verbatim to workload certificates)")
	}
	roots := x509.NewCertPool()
	for _, c := range readCerts(t, file(ca.RootCertFile)) {
		roots.AddCert(c)
	}

	// Sign a workload certificate with istiod's CA code and verify it as a peer would.
	td := os.Getenv("MESHBRIDGE_TRUST_DOMAIN")
	if td == "" && len(caCert.PermittedURIDomains) > 0 {
		td = caCert.PermittedURIDomains[0]
	}
	if td == "" {
		td = "cluster.local"
	}
	istioCA, err := ca.NewIstioCA(opts)
	if err != nil {
		t.Fatalf("ca.NewIstioCA: %v", err)
	}
	id := fmt.Sprintf("spiffe://%s/ns/default/sa/default", td)
	csr, _, err := util.GenCSR(util.CertOptions{Host: id, ECSigAlg: util.EcdsaSigAlg})
	if err != nil {
		t.Fatalf("GenCSR: %v", err)
	}
	signed, err := istioCA.SignWithCertChain(csr, ca.CertOpts{SubjectIDs: []string{id}, TTL: time.Hour})
	if err != nil {
		t.Fatalf("istiod's CA could not sign a workload certificate for %s: %v", id, err)
	}
	if err := verifyChainPEM([]byte(strings.Join(signed, "")), roots); err != nil {
		t.Fatalf("workload certificate for %s signed by istiod's CA does not verify against root-cert.pem: %v", id, err)
	}
	t.Logf("workload certificate for %s, signed by istiod's CA code, verifies against root-cert.pem", id)

	if wl := os.Getenv("MESHBRIDGE_WORKLOAD_CERT"); wl != "" {
		pemBytes, err := os.ReadFile(wl)
		if err != nil {
			t.Fatalf("MESHBRIDGE_WORKLOAD_CERT: %v", err)
		}
		err = verifyChainPEM(pemBytes, roots)
		if os.Getenv("MESHBRIDGE_EXPECT_FAIL") == "1" {
			if err == nil {
				t.Fatalf("%s verifies against root-cert.pem, but it was expected to FAIL", wl)
			}
			t.Logf("%s fails verification as expected: %v", wl, err)
		} else {
			if err != nil {
				t.Fatalf("%s does not verify against root-cert.pem: %v", wl, err)
			}
			t.Logf("%s verifies against root-cert.pem", wl)
		}
	}
}

// verifyChainPEM verifies leaf (first PEM block) with the other blocks as intermediates.
func verifyChainPEM(chainPEM []byte, roots *x509.CertPool) error {
	certs, err := parseCerts(chainPEM)
	if err != nil {
		return err
	}
	if len(certs) == 0 {
		return errors.New("no certificate in PEM input")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err = certs[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	return err
}

func parseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return out, nil
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
}

func readCerts(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := parseCerts(b)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return certs
}

func firstCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	certs := readCerts(t, path)
	if len(certs) == 0 {
		t.Fatalf("%s: no certificate", path)
	}
	return certs[0]
}
