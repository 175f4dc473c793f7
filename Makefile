# Two entry points: `make demo` and `make test`. Both create .venv if it is missing.
PY := .venv/bin/python
# CPU build of torch (a bare `torch` requirement would pull a multi-GB CUDA build).
TORCH := torch==2.13.0

.PHONY: demo demo-adapter test bench clean-venv

.venv/.installed: pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt -e ".[dev]"
	touch .venv/.installed

demo: .venv/.installed
	$(PY) -m memory_transformer demo --config configs/demo.yaml

demo-adapter: .venv/.installed
	$(PY) -m memory_transformer demo-adapter --base-config configs/demo_adapter_base.yaml --config configs/demo_adapter.yaml

test: .venv/.installed
	$(PY) -m pytest

bench: .venv/.installed
	$(PY) bench/memory_scaling.py

clean-venv:
	rm -rf .venv
