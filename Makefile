# Sluice: the two commands a newcomer needs are `make demo` and `make test`; each runs `make setup`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
BUILD     := build
BPF_OUT   := $(BUILD)/bpf
VMLINUX_H := $(BUILD)/vmlinux.h
BPF_SRCS  := $(wildcard bpf/*.c)
BPF_OBJS  := $(patsubst bpf/%.c,$(BPF_OUT)/%.o,$(BPF_SRCS))
BPF_HDRS  := $(wildcard bpf/lib/*.h)
CLANG     ?= clang
# The datapath version, stamped into every program (bpf/lib/common.h): a new version is new code
# (new program tags) with the same behaviour. A set of another version goes elsewhere, e.g.
# `make bpf BPF_OUT=/tmp/v2 SL_DATAPATH_VERSION=2` (build/bpf is not rebuilt when only this changes).
SL_DATAPATH_VERSION ?= 1
BPF_CFLAGS := -O2 -g -target bpf -D__TARGET_ARCH_x86 -Wall -Werror -Wno-unused-function \
              -DSL_DATAPATH_VERSION=$(SL_DATAPATH_VERSION) -I$(BUILD) -Ibpf -Ibpf/lib
SETUP_STAMP := $(VENV)/.setup-done
# The CNI plugin (cni/sluice.c), compiled with the constants it shares with the agent, which
# src/sluice/agent_protocol.py renders as a header. Static: nothing to resolve at each pod's start.
CNI_OUT    := $(BUILD)/cni
CNI_PLUGIN := $(CNI_OUT)/sluice
CNI_CFLAGS := -O2 -std=c11 -Wall -Wextra -Werror -static -I$(CNI_OUT)
# libcni's own cnitool, the CNI client the lab's test pods are made with (verify.yml ships it to nodes).
CNITOOL   := $(BUILD)/cnitool

.PHONY: help setup bpf cni artifacts test soak sanity lint molecule demo clean kubernetes conformance

help:
	@echo "make demo    set up, bring the lab up, converge it with site.yml, run the connectivity suite"
	@echo "make test    set up and run the whole test suite, collection checks included (what .ci/run calls)"
	@echo "make soak    restarts and datapath upgrades under traffic, SOAK_ROUNDS times (longer than make test)"
	@echo "make kubernetes   build the upstream Kubernetes programs the lab runs into a cache (lab/k8s/build.sh)"
	@echo "make conformance  run the upstream sig-network and NetworkPolicy e2e suites against the demo's lab"
	@echo "make bpf     build the datapath objects under $(BPF_OUT)/"
	@echo "make cni     build the CNI plugin $(CNI_PLUGIN) (cni/sluice.c)"
	@echo "make setup   install system packages and the pinned Python environment in $(VENV)"

# apt packages and the venv; re-runs only when a requirements list changes.
setup: $(SETUP_STAMP)
$(SETUP_STAMP): apt-packages.txt requirements.txt requirements-dev.txt pyproject.toml
	@if [ "$$(id -u)" != 0 ]; then echo "make setup needs root (apt, BPF, namespaces)"; exit 1; fi
	@missing=$$(grep -v '^#' apt-packages.txt | xargs -n1 | while read -r p; do \
	    dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'ok installed' || echo "$$p"; done); \
	if [ -n "$$missing" ]; then \
	    echo "apt: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

bpf: $(BPF_OBJS)

cni: $(CNI_PLUGIN)

$(CNI_OUT)/protocol.h: src/sluice/agent_protocol.py src/sluice/cni/spec.py src/sluice/cni/errors.py | $(SETUP_STAMP)
	@mkdir -p $(@D)
	$(PY) -m sluice.agent_protocol > $@.tmp && mv $@.tmp $@

$(CNI_PLUGIN): cni/sluice.c $(CNI_OUT)/protocol.h
	$(CC) $(CNI_CFLAGS) -o $@ $<

# What the roles ship to nodes: the datapath objects, the CNI plugin and wheels of the node
# package with its dependencies (reproducible, so an unchanged tree re-deploys nothing).
WHEELS := $(BUILD)/wheels
artifacts: setup bpf cni
	@mkdir -p $(WHEELS)
	@rm -f $(WHEELS)/sluice-*.whl
	@# setuptools builds in build/lib and keeps what it copied there before: a module removed from src/ would ship
	@rm -rf $(BUILD)/lib $(BUILD)/bdist.*
	SOURCE_DATE_EPOCH=315532800 $(PY) -m pip wheel -q --disable-pip-version-check --no-deps -w $(WHEELS) .
	$(PY) -m pip download -q --disable-pip-version-check --only-binary=:all: -d $(WHEELS) -r requirements.txt
	cp requirements.txt $(WHEELS)/requirements.txt

$(VMLINUX_H):
	@mkdir -p $(@D)
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(BPF_OUT)/%.o: bpf/%.c $(BPF_HDRS) $(VMLINUX_H)
	@mkdir -p $(@D)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

# The whole suite: the kernel tests (tests/bpf, tests/runtime, tests/lab) with pytest, then the collection checks
# (make sanity: ansible-test sanity, then ansible-test units, which runs tests/unit). pytest leaves tests/unit to
# ansible-test units rather than running the module tests twice: ansible-test units is the one that must pass for
# the collection (it imports the modules from the ansible_collections/sluice/network copy, as a controller does),
# and it runs exactly the same test files. `pytest tests/unit` still works on its own while editing.
# The lab tests converge labs with the collection, which ships the artifacts and cnitool.
test: setup artifacts $(CNITOOL) kubernetes
	$(VENV)/bin/pytest -p no:cacheprovider tests --ignore=tests/unit
	$(MAKE) --no-print-directory sanity
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory molecule

# Longer than `make test` allows: tests/lab/test_reliability.py with SOAK_ROUNDS rounds of agent kill -9 on every
# node, a clean agent restart and a datapath upgrade (versions 3 and 2 in turn) under one flow that must lose
# nothing, between the upgrade and uninstall tests (a minute or more a round on a 2-vCPU machine).
SOAK_ROUNDS ?= 10
soak: setup artifacts $(CNITOOL)
	SLUICE_SOAK_ROUNDS=$(SOAK_ROUNDS) $(VENV)/bin/pytest -p no:cacheprovider -s tests/lab/test_reliability.py

clean:
	rm -rf $(BUILD)

# Local multi-node lab (lab/lab.py): LAB_NODES nodes reached over SSH through the
# generated inventory/lab/hosts.yml, plus an external client namespace.
LAB_NODES ?= 3
lab-up: setup
	$(PY) lab/lab.py up --nodes $(LAB_NODES)

# libcni's own cnitool (CNITOOL, defined at the top): the CNI client of the lab's test pods.
$(CNITOOL): lab/build-cnitool.sh | setup
	lab/build-cnitool.sh $(abspath $@)

# The collection end to end on a lab of its own: create, converge, idempotence, verify, destroy.
molecule: artifacts $(CNITOOL)
	PATH=$(abspath $(VENV))/bin:$$PATH molecule test

# The README's first command: lab up, converge, idempotence, connectivity suite, VXLAN, a service removed.
demo: artifacts $(CNITOOL) kubernetes
	$(PY) lab/demo.py

# Upstream Kubernetes v1.34.x built from source through the Go module proxy into a cache outside the checkout
# ($$SLUICE_K8S_CACHE, default ~/.cache/sluice/k8s), reused by every later run on this machine: the control plane,
# kubelet, kubectl, e2e.test with ginkgo, crictl, CoreDNS, agnhost and pause. Each program is rebuilt only when
# lab/k8s/*/go.{mod,sum} change.
kubernetes:
	lab/k8s/build.sh

# The upstream sig-network [Conformance] and NetworkPolicy e2e suites against the lab `make demo` left up;
# the report goes to conformance/results/ (latest.md indexes it).
conformance: setup kubernetes
	$(PY) lab/conformance.py

# No `setup` prerequisite: cleaning up must work even when the venv does not (lab.py is stdlib only).
lab-down:
	$(if $(wildcard $(PY)),$(PY),python3) lab/lab.py down

# ---- Ansible collection checks (plugins/, tests/unit, tests/sanity) ----------------------------
# ansible-test needs the collection at a path ending in ansible_collections/<ns>/<name>: a copy of the
# git-tracked and untracked-not-ignored files (collections/ holds a symlink back to the root).
# Offline: ansible-test's get-pip download is replaced by a stand-in (tests/sanity/get_pip_offline.py).
COLL_COPY    := $(BUILD)/ansible_collections/sluice/network
GET_PIP_STUB := $(HOME)/.ansible/test/cache/get_pip_24_2.py
ANSIBLE_TEST := env PATH=$(abspath $(VENV))/bin:$$PATH ansible-test

$(GET_PIP_STUB): tests/sanity/get_pip_offline.py
	@mkdir -p $(@D)
	cp $< $@

collection-copy:
	rm -rf $(COLL_COPY) && mkdir -p $(COLL_COPY)
	git ls-files -co --exclude-standard -z | grep -zv '^collections/' \
	    | while IFS= read -r -d '' f; do [ -e "$$f" ] && printf '%s\0' "$$f"; done \
	    | tar --null -T - -cf - | tar -xf - -C $(COLL_COPY)
	@# its own (empty) git repository: ansible-test would otherwise find the checkout's, where build/ is ignored
	git -C $(COLL_COPY) init -q

sanity: setup bpf $(GET_PIP_STUB) collection-copy
	cd $(COLL_COPY) && $(ANSIBLE_TEST) sanity --python 3.11 --color no
	cd $(COLL_COPY) && $(ANSIBLE_TEST) units --python 3.11 --color no

lint: setup
	$(VENV)/bin/ansible-lint --profile production

.PHONY: collection-copy

# ---- Benchmarks (bench/, not tests: no thresholds, not part of `make test`) --------------------
# Writes bench/results/<date>.{json,md}, latest.md and PNG plots; bench/README.md says what each
# section measures. BENCH_ONLY=paths,services,... selects sections, BENCH_QUICK=1 shortens runs,
# BENCH_NO_LAB=1 skips timing site.yml on a lab of its own.
BENCH_STAMP := $(VENV)/.bench-deps-done
bench: setup artifacts $(CNITOOL) $(BENCH_STAMP) kubernetes
	$(PY) -m bench $(if $(BENCH_ONLY),--only $(BENCH_ONLY)) $(if $(BENCH_QUICK),--quick) $(if $(BENCH_NO_LAB),--no-lab)

$(BENCH_STAMP): requirements-bench.txt $(SETUP_STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	@touch $@

.PHONY: bench
