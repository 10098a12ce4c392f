VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench bench-quick lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat  # a .pth path, no import-hook finder: pd starts ~15 ms faster
	touch $(STAMP)

## make run: the daemon in the foreground on the default home (~/.port-daddy)
run: $(STAMP)
	$(VENV)/bin/pd daemon

## make test: lint, then the whole suite against real daemons
test: $(STAMP)
	$(VENV)/bin/ruff check portdaddy tests bench
	$(PY) -m pytest $(PYTEST_ARGS)

## make bench: the full benchmark table (bench/results.json)
bench: $(STAMP)
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m bench --quick --check

lint: $(STAMP)
	$(VENV)/bin/ruff check portdaddy tests bench
	$(VENV)/bin/ruff format --check portdaddy tests bench

clean:
	rm -rf $(VENV) build *.egg-info
