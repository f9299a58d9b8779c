# filterd: the two set-up commands of the README, and a few more for developers.
#   make run    install what filterd needs and start it in the foreground on built-in defaults
#   make test   install everything the tests need (Postfix, clamd, DNS, Redis...) and run them all
#   make eval   train on half A of the time split, measure half B (bench/eval_split.py; EVAL_ARGS=...)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STATE ?= ./var
PYTEST_ARGS ?=
EVAL_ARGS ?=

.PHONY: run test test-unit test-slow bench eval lint clean

run:
	@scripts/bootstrap.sh run
	@scripts/run.sh $(STATE)

test:
	@scripts/bootstrap.sh test
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-unit:
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-slow:
	@scripts/bootstrap.sh bench   # the SpamAssassin-import equivalence test reads Debian's stock rules
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

bench:
	@scripts/bootstrap.sh bench
	@bench/run.sh

eval:
	$(PY) bench/eval_split.py $(EVAL_ARGS)

lint:
	$(VENV)/bin/ruff check filterd tests bench || true

clean:
	rm -rf $(VENV) var build *.egg-info
