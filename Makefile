# `make bench` runs the benchmark (the main job), `make test` the test suite; both install first.
# With a torch already installed (e.g. your own CUDA build) it is kept; otherwise torch 2.13.0 is installed.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
BENCH_ARGS ?=

.PHONY: install test bench clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install "triton==$(TRITON_VERSION)"
	# numpy < 2.4: Triton 3.6's interpreter calls int() on 1-element arrays, which NumPy 2.4 rejects.
	$(PYTHON) -m pip install "setuptools>=64" wheel ninja pytest expecttest matplotlib "numpy<2.4"
	$(PYTHON) -m pip install --no-build-isolation -e .

test: install
	$(PYTHON) -m pytest tests

bench: install
	$(PYTHON) -m benchmarks.bench $(BENCH_ARGS)

clean:
	rm -rf build attnkern/*.so *.egg-info
