# hallkiosk: the two commands a fresh Debian machine needs are `make demo` and `make test`.
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest

.PHONY: all setup demo test test-fast bench city hall lint clean help

help:
	@echo "make demo   - run one emulated kiosk against a real local broker (sets up .venv)"
	@echo "make test   - the test suite: protocol, device, broker integration, end to end"
	@echo "make bench  - benchmarks: tap-to-ticket latency, idle RSS/CPU, start-to-ready"
	@echo "make hall   - a hall day: 50 real agents, 13 cells, 5,708 tickets, faults, report in hall-out/"
	@echo "make city   - a city on loopback: 3-node NATS cluster, bridged hall brokers, faults, figures"
	@echo "make qemu-image - build the arm64 Debian image with the agent installed (cached)"
	@echo "make qemu-test  - boot it under QEMU and check boot, ticket, kill -9, power-off"
	@echo "make qemu-update - signed A/B updates of that image, QEMU killed 20 times mid-update"
	@echo "make clean  - remove .venv and generated output"

setup:
	@scripts/bootstrap.sh test

demo: setup
	$(PY) -m hallkiosk.cli demo --out demo-out

# The QEMU boot is its own tier (make qemu-test): it is deselected here, not skipped.
test: setup
	$(PYTEST) -q -p no:cacheprovider -m "not qemu"

test-fast: setup
	$(PYTEST) -q -p no:cacheprovider -m "not e2e and not qemu"

bench: setup
	$(PY) -m hallkiosk.cli bench --out bench-out

# The hall day (issue 14): 50 agent processes, one broker, the ops monitor, faults; report and
# plot in hall-out/. A short version runs in make test (tests/test_hall_day.py).
hall: setup
	$(PY) -m hallkiosk.cli hall --out hall-out

# The city tier (docs/city.md): its own 3-node NATS cluster and hall brokers on loopback.
city: setup
	$(PY) -m city --out city-out

# The QEMU tier: make qemu-image (debootstrap arm64, cached in ~/.cache/hallkiosk-qemu) and
# make qemu-test (boots it; see docs/qemu.md).
include qemu/Makefile.inc

clean:
	rm -rf .venv demo-out bench-out city-out hall-out .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
