# fiber-edge: one-command set-up, tests, data, training recipes, export and reports.
# Every target uses the project's virtual environment in .venv (made by `make setup`).
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
# The CPU install path: torch 2.13.0 (CPU build) first, so nothing pulls a multi-GB CUDA torch.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup test test-fast native clean demo

setup: .venv/.installed

.venv/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e ".[train,compress,trt,video,text,bench,dev]"
	touch $@

# The main job on a fresh clone: set up, then detect on the bundled examples with the shipped model.
DEMO_PROMPT ?= blue star. red star. brown star. blue bolt
demo: setup
	$(PY) -m runtime.detect --image examples/ --prompt "$(DEMO_PROMPT)" \
		--package models/fiber-nano-int8 --save out/demo --json out/demo.jsonl --headless

native:
	$(PY) setup.py -q build_ext --inplace

# The suite on pytest-xdist workers, one per core (at most 4): each test module runs whole on one
# worker, so its shared fixtures (a built package, a converted checkpoint) are built once; the long
# modules are handed out first (tests/conftest.py). PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= logical
PYTEST_XDIST = -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadfile --no-loadscope-reorder

# Bytecode caching on for the run, even where the environment turns it off (container images often
# set PYTHONDONTWRITEBYTECODE): without it every worker compiles the project and re-writes the
# tests' asserts at each run (collection 11 s instead of 5 s). The caches go to __pycache__/ (ignored).
PYTEST_ENV = env -u PYTHONDONTWRITEBYTECODE

test: setup
	$(PYTEST_ENV) $(PY) -m pytest -q $(PYTEST_XDIST) tests

test-fast: setup
	$(PYTEST_ENV) $(PY) -m pytest -q $(PYTEST_XDIST) -m "not slow" tests

clean:
	rm -rf build runtime/*.so .pytest_cache

# ---- the fiber-nano recipe: data -> stage 1 (coarse) -> stage 2 (fine) -> evaluation.
# Sized for ~60 min on this 2-core CPU. Measured at batch 16: coarse ~1.7-1.8 samples/s, fine
# ~8 samples/s with 1 thread (busy machine) or ~13 with 2 threads (idle machine only: on a shared,
# busy CPU 2 threads run 5-10x slower). Each step is one plain command; a finished step is not
# rerun (file targets); an interrupted training step: rerun its command with --resume. The text
# tower starts from the pretrained MiniLM-L6 (fiber-nano has its shape); fine reads it from coarse.
SYNTH_TRAIN ?= data/synth-train
SYNTH_VAL ?= data/synth-val
SYNTH_TRAIN_IMAGES ?= 5000
SYNTH_VAL_IMAGES ?= 500
NANO_RUN ?= runs/nano
NANO_BATCH ?= 16
NANO_COARSE_STEPS ?= 150
NANO_FINE_STEPS ?= 2400
NANO_THREADS ?= 2
# bf16 autocast on a CPU with native bf16 (AVX-512 BF16 / AMX): fwd+bwd ~1.85x faster than fp32,
# same accuracy at 400 steps (R@1 27.5 vs 30.3 on 284 val phrases, within noise); lr 1e-3 beat 3e-4
# at equal steps. Without native bf16 (e.g. an AVX2-only EPYC) autocast is emulated and ~10x slower
# than fp32 (12 steps > 300 s vs 32 s), so fp32 there.
TRAIN_AMP ?= $(shell grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo bf16 || echo off)
FINE_LR ?= 1e-3
TEXT_LR_MULT ?= 0.1
FINE_FLAGS = --lr $(FINE_LR) --text-lr-mult $(TEXT_LR_MULT) --amp $(TRAIN_AMP)

.PHONY: data train-nano eval-nano

data: $(SYNTH_TRAIN)/grounding.json $(SYNTH_VAL)/grounding.json

$(SYNTH_TRAIN)/grounding.json:
	$(PY) -m fiber.data.synth --out $(SYNTH_TRAIN) --images $(SYNTH_TRAIN_IMAGES) --seed 0

$(SYNTH_VAL)/grounding.json:
	$(PY) -m fiber.data.synth --out $(SYNTH_VAL) --images $(SYNTH_VAL_IMAGES) --seed 1

$(NANO_RUN)/coarse/final/model.safetensors: | data
	OMP_NUM_THREADS=$(NANO_THREADS) $(PY) -m train.coarse --config fiber-nano --data $(SYNTH_TRAIN) --out $(NANO_RUN)/coarse --text-init minilm --max-steps $(NANO_COARSE_STEPS) --batch-size $(NANO_BATCH) --amp $(TRAIN_AMP) --seed 0

$(NANO_RUN)/fine/final/model.safetensors: $(NANO_RUN)/coarse/final/model.safetensors
	OMP_NUM_THREADS=$(NANO_THREADS) $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init $(NANO_RUN)/coarse --out $(NANO_RUN)/fine --max-steps $(NANO_FINE_STEPS) --batch-size $(NANO_BATCH) $(FINE_FLAGS) --seed 0

train-nano: $(NANO_RUN)/fine/final/model.safetensors
	$(MAKE) eval-nano

eval-nano:
	OMP_NUM_THREADS=$(NANO_THREADS) $(PY) -m train.evaluate --checkpoint $(NANO_RUN)/fine --data $(SYNTH_VAL) --json $(NANO_RUN)/eval.json

# ---- ablations at the recipe's budget (docs/results.md). fine-only: no stage 1, its time goes to
# stage 2 (150 coarse steps cost as much as ~730 fine steps, measured: 8.4 vs 1.7 s/step at 1
# thread); late fusion: K = 0 fused backbone layers, the same head and steps.
ABL_FINE_ONLY_STEPS ?= 3130
.PHONY: ablation-fine-only ablation-late

ablation-fine-only: | data
	OMP_NUM_THREADS=$(NANO_THREADS) $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init none --text-init minilm --out runs/abl-fineonly --max-steps $(ABL_FINE_ONLY_STEPS) --batch-size $(NANO_BATCH) $(FINE_FLAGS) --seed 0
	OMP_NUM_THREADS=$(NANO_THREADS) $(PY) -m train.evaluate --checkpoint runs/abl-fineonly --data $(SYNTH_VAL) --json runs/abl-fineonly/eval.json

ablation-late: | data
	OMP_NUM_THREADS=$(NANO_THREADS) $(PY) -m train.coarse --config fiber-nano --late-fusion --data $(SYNTH_TRAIN) --out runs/abl-late/coarse --text-init minilm --max-steps $(NANO_COARSE_STEPS) --batch-size $(NANO_BATCH) --amp $(TRAIN_AMP) --seed 0
	OMP_NUM_THREADS=$(NANO_THREADS) $(PY) -m train.fine --config fiber-nano --late-fusion --data $(SYNTH_TRAIN) --init runs/abl-late/coarse --out runs/abl-late/fine --max-steps $(NANO_FINE_STEPS) --batch-size $(NANO_BATCH) $(FINE_FLAGS) --seed 0
	OMP_NUM_THREADS=$(NANO_THREADS) $(PY) -m train.evaluate --checkpoint runs/abl-late/fine --data $(SYNTH_VAL) --json runs/abl-late/eval.json

# ---- teacher -> student distillation. train-teacher: fiber-t, stage 2 only (the nano
# ablation showed stage 1 does not pay at these budgets) with the text tower from MiniLM-L6, then
# evaluation; measured at batch 16 on this 2-core CPU with 2 threads: 4.3 samples/s when nothing
# else ran, 4942 s (82 min) for 1200 steps with other jobs now and then. kd-compare: KD against
# the student alone at equal steps, batch, lr and seed, both stage 2 only: `make -j2 kd-compare` trains the two at 1 thread each side by side, then
# evaluates both. The KD student starts from the teacher where keys and shapes fit (the text
# tower), the student alone from MiniLM-L6. A KD step also runs the teacher's forward. An
# interrupted training step: rerun its command with --resume. distill-nano = the KD half.
TEACHER_RUN ?= runs/teacher
TEACHER_FINE_STEPS ?= 1200
TEACHER_THREADS ?= $(NANO_THREADS)
KD_STEPS ?= 600
KD_THREADS ?= 1
KD_RUN ?= runs/nano-kd
ALONE_RUN ?= runs/nano-alone

.PHONY: train-teacher distill-nano kd-compare ablation-kd-init

$(TEACHER_RUN)/final/model.safetensors: | data
	OMP_NUM_THREADS=$(TEACHER_THREADS) $(PY) -m train.fine --config fiber-t --data $(SYNTH_TRAIN) --init none --text-init minilm --out $(TEACHER_RUN) --max-steps $(TEACHER_FINE_STEPS) --batch-size $(NANO_BATCH) $(FINE_FLAGS) --seed 0

$(TEACHER_RUN)/eval.json: $(TEACHER_RUN)/final/model.safetensors
	OMP_NUM_THREADS=$(TEACHER_THREADS) $(PY) -m train.evaluate --checkpoint $(TEACHER_RUN) --data $(SYNTH_VAL) --json $@

train-teacher: $(TEACHER_RUN)/eval.json

$(KD_RUN)/final/model.safetensors: $(TEACHER_RUN)/final/model.safetensors
	OMP_NUM_THREADS=$(KD_THREADS) $(PY) -m compress.distill --teacher $(TEACHER_RUN) --student-config fiber-nano --data $(SYNTH_TRAIN) --out $(KD_RUN) --max-steps $(KD_STEPS) --batch-size $(NANO_BATCH) $(FINE_FLAGS) --seed 0

$(KD_RUN)/eval.json: $(KD_RUN)/final/model.safetensors
	OMP_NUM_THREADS=$(KD_THREADS) $(PY) -m train.evaluate --checkpoint $(KD_RUN) --data $(SYNTH_VAL) --json $@

$(ALONE_RUN)/final/model.safetensors: | data
	OMP_NUM_THREADS=$(KD_THREADS) $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init none --text-init minilm --out $(ALONE_RUN) --max-steps $(KD_STEPS) --batch-size $(NANO_BATCH) $(FINE_FLAGS) --seed 0

$(ALONE_RUN)/eval.json: $(ALONE_RUN)/final/model.safetensors
	OMP_NUM_THREADS=$(KD_THREADS) $(PY) -m train.evaluate --checkpoint $(ALONE_RUN) --data $(SYNTH_VAL) --json $@

# ablation-kd-init: the KD student's init from the teacher without the KD losses (every weight 0:
# no teacher pass), same steps; separates what the init and what the teacher's targets bring.
INIT_ONLY_RUN ?= runs/nano-initonly
ablation-kd-init: $(TEACHER_RUN)/final/model.safetensors
	OMP_NUM_THREADS=$(KD_THREADS) $(PY) -m compress.distill --teacher $(TEACHER_RUN) --student-config fiber-nano --data $(SYNTH_TRAIN) --out $(INIT_ONLY_RUN) --max-steps $(KD_STEPS) --batch-size $(NANO_BATCH) $(FINE_FLAGS) --seed 0 --kd-weights logits=0,box=0,ctr=0,feat=0
	OMP_NUM_THREADS=$(KD_THREADS) $(PY) -m train.evaluate --checkpoint $(INIT_ONLY_RUN) --data $(SYNTH_VAL) --json $(INIT_ONLY_RUN)/eval.json

distill-nano: $(KD_RUN)/eval.json

# distill-nano-long: the shipped distilled student. The 600-step KD run (KD_RUN), copied and
# resumed to LONG_KD_STEPS on that longer schedule (multistep: lr back to 1e-3 at step 600, x0.1 at
# 67% and 89% of LONG_KD_STEPS), 2 threads with nothing else running: 6.5 samples/s, 4455 s. The
# copy keeps KD_RUN (the equal-steps comparison) as it was. Then: make package-nano (its default).
LONG_KD_RUN ?= runs/nano-kd2400
LONG_KD_STEPS ?= 2400
LONG_KD_THREADS ?= $(NANO_THREADS)
.PHONY: distill-nano-long

$(LONG_KD_RUN)/final/model.safetensors: $(KD_RUN)/final/model.safetensors
	@test ! -e $(LONG_KD_RUN)/checkpoints || { echo "$(LONG_KD_RUN) already holds checkpoints: resume it with compress.distill --resume, or remove it"; exit 2; }
	mkdir -p $(LONG_KD_RUN) && cp -r $(KD_RUN)/checkpoints $(KD_RUN)/metrics.jsonl $(LONG_KD_RUN)/
	OMP_NUM_THREADS=$(LONG_KD_THREADS) $(PY) -m compress.distill --teacher $(TEACHER_RUN) --student-config fiber-nano --data $(SYNTH_TRAIN) --out $(LONG_KD_RUN) --resume --max-steps $(LONG_KD_STEPS) --batch-size $(NANO_BATCH) $(FINE_FLAGS) --seed 0 --no-progress

$(LONG_KD_RUN)/eval.json: $(LONG_KD_RUN)/final/model.safetensors
	OMP_NUM_THREADS=$(LONG_KD_THREADS) $(PY) -m train.evaluate --checkpoint $(LONG_KD_RUN) --data $(SYNTH_VAL) --json $@

distill-nano-long: $(LONG_KD_RUN)/eval.json

kd-compare: $(KD_RUN)/eval.json $(ALONE_RUN)/eval.json
	@$(PY) -c "import json,sys; [print(f'{p:28s}', '  '.join(f'{k} {json.load(open(p))[\"metrics\"][k]:.1f}' for k in ('R@1', 'R@5', 'R@10', 'R@1_relation', 'refexp', 'mAP'))) for p in sys.argv[1:]]" $^

# ---- attribute-aware fiber-nano. Starting from the shipped FP32 package's own weights (read back
# exactly from its ONNX graphs by compress.recover): phase 1, 600 stage-2 steps with attribute
# prompts (80% of the detection images and 30% of the caption samples prompted with "colour kind"
# phrases + absent hard negatives, a third of those with the colour names alone; half of the other
# captions get absent hard negatives appended); phase 2, 1200 steps with the same data and a
# training-only colour classifier on the head's region features (--colour-aux), without which the
# head stays colour-blind (docs/results.md section 6). 1.5-3 s/step at 1 thread on this shared CPU:
# ~25 + ~50 min, then phase 3 below. package-nano-attr exports both packages (calibrated default threshold, INT8 with no
# FP32 groups) into ATTR_PKG; attributes-nano: the attribute metric of the shipped packages (and the absent-look-alikes-only one).
ATTR_RUN ?= runs/nano-attr
ATTR_RUN2 ?= runs/nano-attr2
ATTR_PKG ?= runs/pkg
# phase 1 started from the KD student's package: models/fiber-nano as of commit 040cfe9^ (since
# re-shipped twice; e.g. `git archive 040cfe9^ models/fiber-nano | tar -x -C /tmp/kd`, then
# ATTR_INIT_PACKAGE=/tmp/kd/models/fiber-nano)
ATTR_INIT_PACKAGE ?= models/fiber-nano
ATTR_DATA_FLAGS = --attribute-prompts 0.8 --hard-negatives 0.5 --colour-prompts 0.35 --caption-swap 0.3
.PHONY: train-nano-attr package-nano-attr attributes-nano

runs/shipped-nano/final/model.safetensors:
	$(PY) -m compress.recover --package $(ATTR_INIT_PACKAGE) --out runs/shipped-nano/final

$(ATTR_RUN)/final/model.safetensors: runs/shipped-nano/final/model.safetensors | data
	OMP_NUM_THREADS=1 $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init runs/shipped-nano --out $(ATTR_RUN) --max-steps 600 --schedule constant --warmup-steps 120 --batch-size $(NANO_BATCH) $(FINE_FLAGS) --seed 0 $(ATTR_DATA_FLAGS) --ckpt-every 200 --no-progress

$(ATTR_RUN2)/final/model.safetensors: $(ATTR_RUN)/final/model.safetensors
	OMP_NUM_THREADS=1 $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init $(ATTR_RUN) --out $(ATTR_RUN2) --max-steps 1200 --batch-size $(NANO_BATCH) $(FINE_FLAGS) --seed 0 $(ATTR_DATA_FLAGS) --colour-aux 1.0 --ckpt-every 200 --no-progress

# phase 3 (runs/nano-attr3): 2000 more steps of phase 2's recipe from its weights, lr 5e-4 with a
# 100-step warm-up and cosine decay, seed 3; ~2.3 s/step at 1 thread in fp32 (77 min). As run, the
# init was the weights of the package phase 2 shipped (runs/shipped-nano, read back exactly by
# compress.recover from models/fiber-nano of commit 040cfe9); replayed, it is phase 2's final.
ATTR_RUN3 ?= runs/nano-attr3
$(ATTR_RUN3)/final/model.safetensors: $(ATTR_RUN2)/final/model.safetensors
	OMP_NUM_THREADS=1 $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init $(ATTR_RUN2) --out $(ATTR_RUN3) --max-steps 2000 --schedule cosine --warmup-steps 100 --batch-size $(NANO_BATCH) --lr 5e-4 --text-lr-mult $(TEXT_LR_MULT) --amp $(TRAIN_AMP) --seed 3 $(ATTR_DATA_FLAGS) --colour-aux 1.0 --ckpt-every 200 --no-progress

# phase 4 (runs/nano-pos): the head's position features (fiber-nano's config adds them, zero at
# the start, lr x10) with the position-query loss (--position-aux: phrases that name a side are
# asked to prefer it, others nothing) and the relation / superlative entries twice per epoch; 1000
# steps of phase 3's recipe, lr 5e-4 cosine (50 warm-up), seed 5, bf16 at 2 threads on the Zen 4
# (~17 min). Phases 1-3 ran before position features existed, so replayed they carry the
# parameter from phase 1 on. As run, the init was the package phase 3 shipped (runs/shipped-nano,
# read back by compress.recover from models/fiber-nano of commit 3758d80); replayed, phase 3's final.
ATTR_RUN4 ?= runs/nano-pos
$(ATTR_RUN4)/final/model.safetensors: $(ATTR_RUN3)/final/model.safetensors
	OMP_NUM_THREADS=2 $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init $(ATTR_RUN3) --out $(ATTR_RUN4) --max-steps 1000 --schedule cosine --warmup-steps 50 --batch-size $(NANO_BATCH) --lr 5e-4 --text-lr-mult $(TEXT_LR_MULT) --amp $(TRAIN_AMP) --seed 5 $(ATTR_DATA_FLAGS) --colour-aux 1.0 --relation-repeat 2 --position-lr-mult 10 --position-aux 1.0 --ckpt-every 200 --no-progress

# phase 5 (runs/nano-tc): the soft-token loss (--token-contrast 1: at each positive anchor a softmax
# over the prompt's tokens must sit on its own phrase, so "blue star" on a blue triangle is pushed
# below "blue triangle" undamped by the focal loss; docs/results.md section 11); 1200 steps of
# phase 4's recipe, seed 7, bf16, ~1.5 s/step at 1 thread beside a second run (30 min). As run, the
# init was the package phase 4 shipped (runs/shipped-pos, read back by compress.recover from
# models/fiber-nano of commit 56c613c, parity 9.5e-7) at OMP_NUM_THREADS=1; replayed, phase 4's final.
ATTR_RUN5 ?= runs/nano-tc
$(ATTR_RUN5)/final/model.safetensors: $(ATTR_RUN4)/final/model.safetensors
	OMP_NUM_THREADS=2 $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init $(ATTR_RUN4) --out $(ATTR_RUN5) --max-steps 1200 --schedule cosine --warmup-steps 50 --batch-size $(NANO_BATCH) --lr 5e-4 --text-lr-mult $(TEXT_LR_MULT) --amp $(TRAIN_AMP) --seed 7 $(ATTR_DATA_FLAGS) --colour-aux 1.0 --relation-repeat 2 --position-lr-mult 10 --position-aux 1.0 --token-contrast 1.0 --ckpt-every 200 --no-progress

# phase 6 (runs/nano-tc6): phase 5's recipe continued for 2400 steps with the soft-token loss at
# weight 2, a lower peak lr (3e-4, cosine), seed 9 (docs/results.md section 12); ~1.4 s/step at 1
# thread on a Sapphire Rapids beside a second run (56 min). As run, the init was the package phase
# 5 shipped (runs/tc1200, read back by compress.recover from models/fiber-nano of commit 86ee257,
# parity 1.4e-6) at OMP_NUM_THREADS=1; replayed, phase 5's final.
ATTR_RUN6 ?= runs/nano-tc6
$(ATTR_RUN6)/final/model.safetensors: $(ATTR_RUN5)/final/model.safetensors
	OMP_NUM_THREADS=2 $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init $(ATTR_RUN5) --out $(ATTR_RUN6) --max-steps 2400 --schedule cosine --warmup-steps 50 --batch-size $(NANO_BATCH) --lr 3e-4 --text-lr-mult $(TEXT_LR_MULT) --amp $(TRAIN_AMP) --seed 9 $(ATTR_DATA_FLAGS) --colour-aux 1.0 --relation-repeat 2 --position-lr-mult 10 --position-aux 1.0 --token-contrast 2.0 --ckpt-every 200 --no-progress

# phase 7 (runs/nano-p7): phase 6's recipe continued for 2400 steps, lr 2.5e-4 cosine, seed 13
# (docs/results.md section 13); ~1.2 s/step at 1 thread on a Sapphire Rapids beside a second run
# (58 min). As run, the init was the package phase 6 shipped (runs/tc6, read back by
# compress.recover from models/fiber-nano of commit 141b017, parity 1.1e-6), started with
# --max-steps 3600 and resumed at step 800 with --max-steps 2400 (the cosine factor stepped from
# 0.88 to 0.76 there); replayed, phase 6's final and one 2400-step schedule.
ATTR_RUN7 ?= runs/nano-p7
$(ATTR_RUN7)/final/model.safetensors: $(ATTR_RUN6)/final/model.safetensors
	OMP_NUM_THREADS=1 $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init $(ATTR_RUN6) --out $(ATTR_RUN7) --max-steps 2400 --schedule cosine --warmup-steps 50 --batch-size $(NANO_BATCH) --lr 2.5e-4 --text-lr-mult $(TEXT_LR_MULT) --amp $(TRAIN_AMP) --seed 13 $(ATTR_DATA_FLAGS) --colour-aux 1.0 --relation-repeat 2 --position-lr-mult 10 --position-aux 1.0 --token-contrast 2.0 --ckpt-every 400 --no-progress

# phase 8, two steps (docs/results.md section 24). 8a (runs/nano-p8a): 1200 steps of kind prompts
# alone from phase 7 (every sample an all-kinds prompt, the kind classifier, the soft-token loss;
# lr 3e-4 cosine, seed 31): the kinds the mixed recipe never concentrates on (hexagons 0.02 -> 0.36)
# at the cost of colours and relations. 8b (runs/nano-p8b): phase 7's mixed recipe from 8a with half
# of the attribute items not drawn for colour names prompted with every kind, and the kind classifier
# (lr 3e-4 cosine, 1200 steps, seed 35). ~1.35 s/step each at 1 thread, bf16, on a Zen 4 beside a
# second run (27 min each); as run, runs/k1-konly and runs/k3-konly-mix.
ATTR_RUN8A ?= runs/nano-p8a
$(ATTR_RUN8A)/final/model.safetensors: $(ATTR_RUN7)/final/model.safetensors
	OMP_NUM_THREADS=1 $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init $(ATTR_RUN7) --out $(ATTR_RUN8A) --max-steps 1200 --schedule cosine --warmup-steps 50 --batch-size $(NANO_BATCH) --lr 3e-4 --text-lr-mult $(TEXT_LR_MULT) --amp $(TRAIN_AMP) --seed 31 --attribute-prompts 1.0 --kind-prompts 1.0 --caption-swap 1.0 --kind-aux 1.0 --token-contrast 2.0 --ckpt-every 200 --no-progress

ATTR_RUN8 ?= runs/nano-p8b
$(ATTR_RUN8)/final/model.safetensors: $(ATTR_RUN8A)/final/model.safetensors
	OMP_NUM_THREADS=1 $(PY) -m train.fine --config fiber-nano --data $(SYNTH_TRAIN) --init $(ATTR_RUN8A) --out $(ATTR_RUN8) --max-steps 1200 --schedule cosine --warmup-steps 50 --batch-size $(NANO_BATCH) --lr 3e-4 --text-lr-mult $(TEXT_LR_MULT) --amp $(TRAIN_AMP) --seed 35 $(ATTR_DATA_FLAGS) --colour-aux 1.0 --relation-repeat 2 --position-lr-mult 10 --position-aux 1.0 --token-contrast 2.0 --kind-prompts 0.5 --kind-aux 1.0 --ckpt-every 200 --no-progress

train-nano-attr: $(ATTR_RUN8)/final/model.safetensors

# the shipped packages: export with a calibrated threshold, quantise, export INT8 (ATTR_SHIP: which run)
ATTR_SHIP ?= $(ATTR_RUN8)
package-nano-attr: $(ATTR_SHIP)/final/model.safetensors
	OMP_NUM_THREADS=1 $(PY) -m compress.export --checkpoint $(ATTR_SHIP) --config fiber-nano --out $(ATTR_PKG)/fiber-nano --data $(NANO_EVAL_DATA) --calibrate --openvino-check --threads 1 --overwrite
	OMP_NUM_THREADS=1 $(PY) -m compress.quantize --checkpoint $(ATTR_SHIP) --config fiber-nano --data $(NANO_CALIB_DATA) --out $(ATTR_SHIP)-quant --overwrite
	OMP_NUM_THREADS=1 $(PY) -m compress.export --checkpoint $(ATTR_SHIP) --config fiber-nano --out $(ATTR_PKG)/fiber-nano-int8 --int8 $(ATTR_SHIP)-quant --data $(NANO_EVAL_DATA) --calibrate --threads 1 --overwrite

# The shipped model on a camera's canvas (docs/results.md section 16): a fixed [H, W] letterbox
# canvas in the camera's aspect with about the square's pixels, from the shipped FP32 package's
# weights (read back by compress.recover); FP32 and INT8 packages into CAMERA_PKG, ~15 min at 1
# thread. The default threshold is calibrated on a held-out split of frames of the camera's aspect
# (CAMERA_SIZES, seed 1 as the validation split); accuracy is recorded on the usual held-out split.
# 4:3 (default): CAMERA_CANVAS=224x288 CAMERA_SIZES="320x240 384x288"; 16:9: CAMERA_CANVAS=192x352
# CAMERA_SIZES="384x216 512x288". Then: python -m runtime.detect --camera 0 --package
# $(CAMERA_PKG)/fiber-nano-int8 --prompt "...".
CAMERA_CANVAS ?= 224x288
CAMERA_SIZES ?= 320x240 384x288
CAMERA_PKG ?= runs/pkg-$(CAMERA_CANVAS)
CAMERA_VAL ?= data/synth-val-$(CAMERA_CANVAS)
.PHONY: package-nano-camera
$(CAMERA_VAL)/detection.json:
	$(PY) -m fiber.data.synth --out $(CAMERA_VAL) --images 500 --seed 1 --size $(CAMERA_SIZES) --overwrite

package-nano-camera: runs/shipped-nano/final/model.safetensors $(CAMERA_VAL)/detection.json | data
	OMP_NUM_THREADS=1 $(PY) -m compress.export --checkpoint runs/shipped-nano --config fiber-nano --canvas $(CAMERA_CANVAS) --out $(CAMERA_PKG)/fiber-nano --data $(NANO_EVAL_DATA) --calibration-data $(CAMERA_VAL) --threads 1 --overwrite
	OMP_NUM_THREADS=1 $(PY) -m compress.quantize --checkpoint runs/shipped-nano --config fiber-nano --canvas $(CAMERA_CANVAS) --data $(NANO_CALIB_DATA) --out runs/shipped-nano-quant-$(CAMERA_CANVAS) --overwrite
	OMP_NUM_THREADS=1 $(PY) -m compress.export --checkpoint runs/shipped-nano --config fiber-nano --canvas $(CAMERA_CANVAS) --out $(CAMERA_PKG)/fiber-nano-int8 --int8 runs/shipped-nano-quant-$(CAMERA_CANVAS) --data $(NANO_EVAL_DATA) --calibration-data $(CAMERA_VAL) --threads 1 --overwrite

attributes-nano:
	$(PY) -m benchmarks.attributes --package models/fiber-nano --package models/fiber-nano-int8 --images 1000 --seed 1414 --threads 1
	$(PY) -m benchmarks.attributes --package models/fiber-nano --package models/fiber-nano-int8 --images 400 --seed 1414 --absent-only

# ---- benchmark report: docs/report/ (report.md, report.json, PNG plots) for the shipped
# INT8 package against its FP32 twin, the teacher and the PyTorch eager student when present, on
# the validation split: every backend installed here, alternating, plus accuracy through the
# runtime. Exit status 1 = the report was written but some part is marked "not measured".
# REPORT_ARGS: e.g. --quick, --limit 300, --threads 1, --backend onnxruntime.
REPORT_PACKAGE ?= models/fiber-nano-int8
REPORT_COMPARE ?= $(wildcard models/fiber-nano)
REPORT_TEACHER ?= $(firstword $(wildcard models/fiber-t) $(patsubst %/final/model.safetensors,%,$(wildcard $(TEACHER_RUN)/final/model.safetensors)))
REPORT_CHECKPOINT ?= $(patsubst %/final/model.safetensors,%,$(wildcard $(NANO_CKPT)/final/model.safetensors))
REPORT_OUT ?= docs/report
REPORT_ARGS ?=

.PHONY: report

report: $(SYNTH_VAL)/grounding.json
	$(PY) -m benchmarks.report --package $(REPORT_PACKAGE) $(foreach p,$(REPORT_COMPARE),--compare $(p)) $(if $(REPORT_TEACHER),--teacher $(REPORT_TEACHER)) $(if $(REPORT_CHECKPOINT),--checkpoint $(REPORT_CHECKPOINT)) --data $(SYNTH_VAL) --out $(REPORT_OUT) $(REPORT_ARGS)

# Model packages of the fiber-nano student (compress.export / compress.quantize): the FP32 package,
# then INT8 (modelopt PTQ calibrated on the training split, sensitivity pass, accuracy guard against
# the held-out split). The shipped packages come from the distilled student of distill-nano-long
# (built first when missing: teacher -> KD 600 -> KD 2400); the student trained alone:
# make package-nano NANO_CKPT=$(NANO_RUN)/fine
NANO_CKPT ?= $(LONG_KD_RUN)
NANO_CALIB_DATA ?= data/synth-train
NANO_EVAL_DATA ?= data/synth-val
NANO_QUANT ?= runs/nano-quant
.PHONY: export-nano package-nano repack-nano

export-nano: setup $(NANO_CKPT)/final/model.safetensors
	$(PY) -m compress.export --checkpoint $(NANO_CKPT) --config fiber-nano --out models/fiber-nano \
		--data $(NANO_EVAL_DATA) --overwrite

# repack-nano: the shipped packages' text.onnx word table -> per-row int8 (compress.repack: for
# packages exported before that was the default, whose checkpoint is not kept), accuracy re-measured.
REPACK_ARGS ?=
repack-nano: $(NANO_EVAL_DATA)/grounding.json
	$(PY) -m compress.repack --package models/fiber-nano --out models/fiber-nano --data $(NANO_EVAL_DATA) \
		--overwrite $(REPACK_ARGS)
	$(PY) -m compress.repack --package models/fiber-nano-int8 --out models/fiber-nano-int8 \
		--data $(NANO_EVAL_DATA) --baseline models/fiber-nano --overwrite $(REPACK_ARGS)

package-nano: export-nano
	$(PY) -m compress.quantize --checkpoint $(NANO_CKPT) --config fiber-nano --data $(NANO_CALIB_DATA) \
		--out $(NANO_QUANT) --sensitivity --overwrite
	$(PY) -m compress.export --checkpoint $(NANO_CKPT) --config fiber-nano --out models/fiber-nano-int8 \
		--int8 $(NANO_QUANT) --data $(NANO_EVAL_DATA) --overwrite
