# `make demo` and `make test` each work alone on a fresh clone: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Nothing is fetched from model hubs: the tiny profile builds its own stand-in SVD.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test lint lab clean

# torch first, from the exact pin (a CPU wheel here), so the package install never pulls another torch.
$(BIN)/cnx: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/cnx

venv: $(BIN)/cnx

# The main job, small: a stand-in SVD, the bundled dancers checked, then a short training run with
# validation, checkpoints and the final export (`cnx train`, the original command's flags).
DEMO := .cache/demo
demo: venv
	$(BIN)/cnx tiny-model $(DEMO)/tiny-svd
	$(BIN)/cnx check-data --meta_info_path data_samples/meta_info.json --sample_n_frames 8 --interval_frame 3 --quiet
	rm -rf $(DEMO)/run
	$(BIN)/cnx train --pretrained_model_name_or_path=$(DEMO)/tiny-svd --output_dir=$(DEMO)/run \
		--meta_info_path=data_samples/meta_info.json \
		--validation_image_folder=data_samples/validation/ground_truth \
		--validation_control_folder=data_samples/validation/pose \
		--validation_image=data_samples/validation/reference_image.png \
		--width=64 --height=96 --sample_n_frames=8 --interval_frame=3 --num_frames=14 \
		--learning_rate=1e-4 --lr_warmup_steps=5 --max_train_steps=30 --checkpointing_steps=15 \
		--validation_steps=30 --use_ema --num_workers=0
	@echo "demo: losses in $(DEMO)/run/logs/steps.jsonl, validation in $(DEMO)/run/validation, weights in $(DEMO)/run/final"

lint: venv
	$(BIN)/ruff check .

# A cell may take 60 s. The limit also bounds a rare stall: now and then the notebook client misses
# the wake-up for a reply the kernel has already sent and only reads it when the cell's timeout
# fires (seen here with nbclient 0.11 / jupyter_client 8.10: the cell passes after exactly the limit).
test: lint
	$(BIN)/pytest --nbmake --nbmake-timeout=60 tests notebooks

lab: venv
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf .cache .pytest_cache .ruff_cache
