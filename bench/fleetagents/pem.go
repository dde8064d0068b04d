package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
)

// fingerprints is the SHA-256 of each certificate's DER in a PEM bundle, lowercase hex: what the
// agent reports as the bundle its istiod serves (tests/support/served.py's fingerprints).
func fingerprints(bundle string) ([]string, error) {
	out := []string{}
	rest := []byte(bundle)
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type == "CERTIFICATE" {
			sum := sha256.Sum256(block.Bytes)
			out = append(out, hex.EncodeToString(sum[:]))
		}
	}
	if len(out) == 0 {
		return nil, errors.New("the trust bundle holds no certificate")
	}
	return out, nil
}
