# meshbridge — developer entry points. `make test` installs everything it needs from nothing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DATA ?= ./.meshbridge
LISTEN ?= 127.0.0.1:8443
PYTEST_ARGS ?=

.PHONY: run test venv sysdeps testbin lint demo bench clean

# constraints.txt: the exact framework versions the speed-ups were tested against (see that file)
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -U pip
	$(VPY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian packages the tests use: PostgreSQL (storage on both engines), SoftHSM2 (PKCS#11), wrk (bench), openssl,
# buildah, podman, mmdebstrap and runc (the image, built and run without a registry: docs/image.md).
sysdeps:
	bash scripts/sysdeps.sh

# Real kube-apiserver, etcd, kubectl, CoreDNS, istioctl, helm, zlint, promtool built from the Go module proxy, cached
# under ~/.cache/meshbridge/testbin/<version>/ (versions pinned in testbin/versions.env).
testbin:
	bash scripts/testbin.sh

run: venv
	@if [ ! -f $(DATA)/root-cert.pem ]; then $(VENV)/bin/meshbridge-ca init --data-dir $(DATA); fi
	@echo "admin token:  $(DATA)/admin-token"
	@echo "trust anchor: $(DATA)/root-cert.pem"
	$(VENV)/bin/meshbridge-ca serve --data-dir $(DATA) --listen $(LISTEN)

lint: venv
	$(VENV)/bin/ruff check ca_server cluster_agent meshbridge_wire tests bench scripts
	$(VENV)/bin/ruff format --check ca_server cluster_agent meshbridge_wire tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: sysdeps venv testbin lint
	bash scripts/run-tests.sh $(PYTEST_ARGS)

demo: venv
	bash scripts/demo.sh

bench: venv sysdeps
	bash bench/run-all.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
