# Two set-up commands for a fresh machine:
#   make demo   create .venv if missing, install requirements, run the pipeline on the demo catalog
#   make test   same install, then the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: install demo test

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	cp requirements.txt $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m pipeline profile=tiny

test: install
	PRICE_NO_PROGRESS=1 $(PY) -m pytest -q
