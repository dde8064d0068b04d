"""Independent checks of certificates: OpenSSL's verifier, Go's crypto/x509, and pkilint.

Our own code (cryptography) builds the certificates, so the tests judge them with tools that
share none of that code: ``openssl verify -x509_strict`` (the C library Istio's ecosystem
tests with), Go's ``x509.Verify`` (what istiod runs on ``cacerts``), and pkilint's RFC 5280
linter. Go is optional: ``GO`` is None without a toolchain, and tests needing it skip.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

OPENSSL = shutil.which("openssl")
GO = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    output: str


class PkilintWarning(UserWarning):
    """A pkilint WARNING (a SHOULD not followed): reported in pytest's warnings summary."""


# --- files ---------------------------------------------------------------------------------


def pem_of(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def write_pem(path: Path, objs: Iterable[x509.Certificate | x509.CertificateRevocationList]) -> Path:
    path.write_bytes(b"".join(pem_of(obj) for obj in objs))
    return path


# --- OpenSSL -------------------------------------------------------------------------------


def openssl_verify(
    leaf: Path,
    *,
    cafile: Path,
    untrusted: Path | None = None,
    attime: datetime | None = None,
    crlfile: Path | None = None,
    extra: Sequence[str] = (),
) -> VerifyResult:
    """``openssl verify -x509_strict -CAfile cafile [-untrusted f] [-attime t] [-CRLfile f -crl_check]``."""
    assert OPENSSL is not None, "openssl is required"
    cmd = [OPENSSL, "verify", "-x509_strict", "-CAfile", str(cafile)]
    if untrusted is not None:
        cmd += ["-untrusted", str(untrusted)]
    if attime is not None:
        cmd += ["-attime", str(int(attime.timestamp()))]
    if crlfile is not None:
        cmd += ["-CRLfile", str(crlfile), "-crl_check"]
    cmd += [*extra, str(leaf)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    return VerifyResult(proc.returncode == 0 and output.rstrip().endswith(": OK"), output)


def openssl_verify_certs(
    workdir: Path,
    leaf: x509.Certificate,
    *,
    roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    attime: datetime | None = None,
    crls: Sequence[x509.CertificateRevocationList] = (),
    extra: Sequence[str] = (),
) -> VerifyResult:
    """``openssl_verify`` on certificate objects (written as PEM files into ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return openssl_verify(
        write_pem(workdir / "leaf.pem", [leaf]),
        cafile=write_pem(workdir / "roots.pem", roots),
        untrusted=write_pem(workdir / "untrusted.pem", intermediates) if intermediates else None,
        attime=attime,
        crlfile=write_pem(workdir / "crls.pem", crls) if crls else None,
        extra=extra,
    )


# --- Go crypto/x509 (as istiod uses it) ------------------------------------------------------

_GO_VERIFIER = r"""
package main

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"strconv"
	"time"
)

func load(path string) []*x509.Certificate {
	data, err := os.ReadFile(path)
	if err != nil {
		panic(err)
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return certs
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			fmt.Println("parse:", err)
			os.Exit(2)
		}
		certs = append(certs, cert)
	}
}

// usage: verify ROOTS INTERMEDIATES LEAF UNIX_TIME
// Like istiod's keycertbundle Verify: empty KeyUsages (so serverAuth, satisfied by "no EKU").
func main() {
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	for _, c := range load(os.Args[1]) {
		roots.AddCert(c)
	}
	for _, c := range load(os.Args[2]) {
		inters.AddCert(c)
	}
	leaf := load(os.Args[3])[0]
	at, _ := strconv.ParseInt(os.Args[4], 10, 64)
	opts := x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: time.Unix(at, 0)}
	_, err := leaf.Verify(opts)
	if err != nil {
		fmt.Println("FAIL:", err)
		os.Exit(1)
	}
	fmt.Println("OK")
}
"""


@functools.cache
def _go_verifier_binary() -> Path:
    assert GO is not None, "a Go toolchain is required"
    workdir = Path(tempfile.mkdtemp(prefix="meshbridge-goverify-"))
    (workdir / "main.go").write_text(_GO_VERIFIER)
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": ""}
    env.setdefault("GOCACHE", str(Path(tempfile.gettempdir()) / "meshbridge-gocache"))
    binary = workdir / "goverify"
    subprocess.run([GO, "build", "-o", str(binary), "main.go"], cwd=workdir, env=env, check=True, timeout=300)
    return binary


def go_verify(
    workdir: Path,
    leaf: x509.Certificate,
    *,
    roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    at: datetime,
) -> VerifyResult:
    """Go's ``x509.Certificate.Verify`` with istiod's options."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(_go_verifier_binary()),
        str(write_pem(workdir / "go-roots.pem", roots)),
        str(write_pem(workdir / "go-intermediates.pem", intermediates)),
        str(write_pem(workdir / "go-leaf.pem", [leaf])),
        str(int(at.timestamp())),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    return VerifyResult(proc.returncode == 0 and output.strip() == "OK", output)


# --- pkilint (RFC 5280 linter) ---------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str
    message: str | None
    node: str

    def __str__(self) -> str:
        return f"{self.severity} {self.code} at {self.node}" + (f": {self.message}" if self.message else "")


@functools.cache
def _pkix_cert_validator() -> Any:
    # the same validator set as pkilint's `lint_pkix_cert` command
    from pkilint.pkix import certificate, extension, name

    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


@functools.cache
def _pkix_crl_validator() -> Any:
    # the same validator set as pkilint's `lint_crl --type CRL --profile PKIX` command
    from pkilint import pkix
    from pkilint.pkix import crl, extension, name

    return crl.create_pkix_crl_validator_container(
        [
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [
            crl.create_issuer_validator_container([]),
            crl.create_validity_validator_container([]),
            crl.create_extensions_validator_container([]),
        ],
    )


def _findings(results: Iterable[Any]) -> list[Finding]:
    return [
        Finding(str(desc.finding.severity), desc.finding.code, desc.message, str(result.node.path))
        for result in results
        for desc in result.finding_descriptions
    ]


def pkilint_findings(cert_pem: str | bytes) -> list[Finding]:
    """Every finding of pkilint's RFC 5280 certificate linter, any severity."""
    from pkilint import loader

    text = cert_pem.decode() if isinstance(cert_pem, bytes) else cert_pem
    doc = loader.RFC5280CertificateDocumentLoader().load_pem_document(text, "certificate")
    return _findings(_pkix_cert_validator().validate(doc.root))


def pkilint_crl_findings(crl_pem: str | bytes) -> list[Finding]:
    """Every finding of pkilint's RFC 5280 CRL linter, any severity."""
    from pkilint import loader

    text = crl_pem.decode() if isinstance(crl_pem, bytes) else crl_pem
    doc = loader.RFC5280CertificateListDocumentLoader().load_pem_document(text, "crl")
    return _findings(_pkix_crl_validator().validate(doc.root))


def errors_reporting_warnings(findings: Sequence[Finding], what: str) -> list[str]:
    """Findings of severity ERROR or FATAL, as strings; WARNINGs go to pytest's warnings summary.
    NOTICE and INFO are informational and dropped."""
    for finding in findings:
        if finding.severity == "WARNING":
            warnings.warn(PkilintWarning(f"pkilint on {what}: {finding}"), stacklevel=2)
    return [str(f) for f in findings if f.severity in ("FATAL", "ERROR")]


def pkilint_errors(cert_pem: str | bytes, what: str = "certificate") -> list[str]:
    """pkilint findings of severity ERROR or worse (WARNINGs are reported as pytest warnings)."""
    return errors_reporting_warnings(pkilint_findings(cert_pem), what)


def pkilint_crl_errors(crl_pem: str | bytes, what: str = "CRL") -> list[str]:
    return errors_reporting_warnings(pkilint_crl_findings(crl_pem), what)
