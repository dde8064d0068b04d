package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// trust is what the simulated agents of one process trust: the anchor they started with and every
// trust bundle the CA handed them since (the real agent adds desired.trust_bundle to its anchors,
// as the Python client adds it to its SSL context). Only a bundle read from an answer over a
// connection verified against the anchors held before is added.
type trust struct {
	mu    sync.Mutex
	known map[string]bool
	pool  atomic.Pointer[x509.CertPool]
}

func newTrust(anchorPEM []byte) (*trust, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(anchorPEM) {
		return nil, errors.New("the trust anchor file holds no PEM certificate")
	}
	t := &trust{known: map[string]bool{}}
	t.pool.Store(pool)
	return t, nil
}

func (t *trust) add(bundle string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.known[bundle] {
		return
	}
	t.known[bundle] = true
	pool := t.pool.Load().Clone()
	pool.AppendCertsFromPEM([]byte(bundle))
	t.pool.Store(pool)
}

// verify checks the server's chain against the anchors trusted now and its name against the host
// dialled (an IP address is matched against the certificate's IP SANs by crypto/x509).
func (t *trust) verify(cs tls.ConnectionState, host string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("the server sent no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
		Roots: t.pool.Load(), Intermediates: inter, DNSName: host,
	})
	if err != nil {
		return &untrusted{err}
	}
	return nil
}

// untrusted is a server the agent does not trust: not retried (a CA it cannot reach is).
type untrusted struct{ err error }

func (e *untrusted) Error() string { return "the CA's certificate is not trusted: " + e.err.Error() }
func (e *untrusted) Unwrap() error { return e.err }

// newClient is one agent's HTTP client: its own transport, so its own keep-alive connection, as
// each cluster's agent has. Go's verification against fixed roots is replaced by trust.verify (the
// anchors change during the run; a tls.Config's RootCAs cannot), run by VerifyConnection (crypto/tls,
// Config.VerifyConnection: "This callback will run for all connections, including resumptions,
// regardless of InsecureSkipVerify").
func newClient(t *trust, host string) *http.Client {
	dialer := &net.Dialer{Timeout: 60 * time.Second}
	tr := &http.Transport{
		DialContext:         dialer.DialContext,
		TLSHandshakeTimeout: 60 * time.Second,
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
		TLSClientConfig: &tls.Config{
			MinVersion:         tls.VersionTLS12,
			InsecureSkipVerify: true, // not skipped: VerifyConnection verifies instead
			VerifyConnection:   func(cs tls.ConnectionState) error { return t.verify(cs, host) },
		},
	}
	return &http.Client{Transport: tr, Timeout: 120 * time.Second}
}
