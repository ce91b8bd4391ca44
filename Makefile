# Set-up and entry points. `make demo` and `make test` each do the whole set-up first.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu

.PHONY: venv system-packages demo test test-slow bench clean

venv: $(STAMP)

# ffmpeg (with ffprobe) from the system's packages; skipped when already on PATH.
system-packages:
	@if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq ffmpeg >/dev/null; \
	fi
	@ffmpeg -version | head -1

$(STAMP): setup.cfg pyproject.toml | system-packages
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q -e '.[test,gcp]'
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/lwm demo --workdir demo_out

test: venv
	$(VENV)/bin/python -m pytest -m "not slow" -n 2 -q

test-slow: venv
	$(VENV)/bin/python -m pytest -m slow -q

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis
