# The two set-up commands of the README. Each creates the project environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch pair that installs and imports on the project's machines (cn_clip imports torchvision).
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PAIR)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PAIR)
	touch $@

# The model `make serve` serves: the demo's unless given, e.g. `make serve MODEL=runs/x/model`.
MODEL ?= runs/demo/model

.PHONY: install demo test bench serve
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/sgmft demo
	@echo "sgmft is in $(VENV)/bin: \`source $(VENV)/bin/activate\` to run the commands above, or \`make serve\` to serve $(MODEL)"

serve: $(VENV)/.installed
	$(VENV)/bin/sgmft serve --model $(MODEL)

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run_all
