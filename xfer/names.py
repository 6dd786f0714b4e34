"""Stable names shared by training, tracking, attacks and reports: tags, metrics, stages, artifacts.

Change a string here and every reader and writer changes with it; never spell these inline.
"""

# Stages: the value of the TAG_STAGE tag on every MLflow run xfer writes.
PRETRAIN = "pretrain"
ESTIMATE = "estimate"   # transferability estimates of each pretrained model for the grid's target (xfer.estimate)
FINETUNE = "finetune"
SCRATCH = "scratch"
ATTACK = "attack"
ADDER = "adder"
REPORT = "report"
TUNE = "tune"
STAGES = (PRETRAIN, ESTIMATE, FINETUNE, SCRATCH, ATTACK, ADDER, REPORT, TUNE)
GRID_STAGES = (PRETRAIN, ESTIMATE, FINETUNE, SCRATCH, ADDER, ATTACK, REPORT)   # a grid's stages in the order they run (--stages)
GRID = "grid"   # the runs that make the MLflow UI's tree: one per grid invocation, one per stage under it (TAG_GRID_STAGE)

# Tags (MLflow run tags).
TAG_STAGE = "xfer.stage"
TAG_KEY = "xfer.key"                      # stable hash of the cell's canonical spec
TAG_PRETRAIN_RUN = "xfer.pretrain_run"    # on finetune runs: the pretrain run id
TAG_SURROGATE_RUN = "xfer.surrogate_run"  # on attack runs
TAG_TARGET_RUN = "xfer.target_run"        # score rows: the target scored (a column of the score table, not a tag)
TAG_SCORED = "xfer.scored"                # on an adversarial set's run: sha of the target runs it is scored on
TAG_EXAMPLES_SHA = "xfer.examples_sha256" # ... and of its examples file, verified on every download
TAG_CHECKPOINT_SHA = "xfer.checkpoint_sha256"
TAG_FAILURE = "xfer.failure"              # reason a run ended FAILED
TAG_GRID_STAGE = "xfer.grid_stage"        # on a stage's parent run (stage GRID): which stage its children are
TAG_NODE = "xfer.node"                    # training runs: the Ray node the cell trained on ("" outside Ray)
TAG_WORKERS = "xfer.workers"              # ... its data-parallel world size
TAG_RESUMED = "xfer.resumed_from_epoch"   # ... after a crash or a stop: the epoch it resumed from
TAG_RESUMABLE = "xfer.resumable"          # ... a KILLED run its grid stopped: the epoch its saved state is from
TAG_IN_SHAPE = "xfer.in_shape"            # ... its model's input shape, "1x28x28" (the attack stage plans by it)
TAG_CLASSES = "xfer.class_names"          # ... its model's class names, a JSON list (likewise)
TAG_SOURCE = "source"                     # pretraining dataset ("" for scratch)
TAG_ARCH = "arch"
TAG_TARGET = "target"                     # dataset trained on in finetune/scratch
TAG_SIZE = "size"
TAG_FREEZE = "freeze_depth"
TAG_SEED = "seed"

# Metrics. Errors are fractions in [0, 1]; accuracies likewise; seconds are wall-clock.
TRAIN_ERROR = "train_error"   # running error over the last `log_every` steps
TRAIN_LOSS = "train_loss"
VAL_ERROR = "val_error"
TEST_ERROR = "test_error"
TEST_ACC = "test_acc"
VAL_ACC = "val_acc"
EPOCH = "epoch"
SECONDS = "seconds"
CLEAN_ACC = "clean_acc"
ADV_ACC = "adv_acc"
SUCCESS_RATE = "success_rate"
WHITEBOX_SUCCESS = "whitebox_success"
# An adversarial set's summary metrics (its run in the MLflow UI); the scores themselves are rows of a table.
TARGETS_SCORED = "targets_scored"                 # targets the set has been scored on
DESCENDANTS_SUCCESS = "descendants_success"       # mean success rate on the surrogate's own fine-tuned descendants
OTHER_SOURCES_SUCCESS = "other_sources_success"   # ... on fine-tuned models of other pretraining sources
MEAN_ADV_ACC = "mean_adv_acc"                     # mean adversarial accuracy over every target scored

# Artifact paths inside a run.
CHECKPOINT_DIR = "checkpoint"         # weights.safetensors + meta.json
CURVE_FILE = "curve.parquet"          # long error curve: step, epoch, seconds, split, error
ADVERSARIAL_DIR = "adversarial"       # adversarial examples (safetensors)
SCORES_DIR = "scores"                 # on the attack stage's run: score rows as Parquet parts (xfer.scores)
RESUME_DIR = "resume"                 # on a stopped cell's run: its last epoch state, to resume from

# Attack-run tags. An attack run holds the adversarial set of one (surrogate, attack setting); its scores on
# every target are rows of the score table (xfer.scores), which carries the lineage flags below as columns.
TAG_ATTACK = "attack"
TAG_EPS = "eps"
TAG_SAME_SOURCE = "same_source"   # "true" / "false": surrogate's pretraining source == target's
TAG_IS_PARENT = "is_parent"       # "true" / "false": surrogate is exactly the target's pretrain run
TAG_EXPERIMENT = "xfer.experiment"
TAG_STAND_INS = "xfer.stand_ins"  # experiment tag: datasets a --fast-dev-run replaced by synthetic stand-ins ("" if none)
# On the grid invocation's run (stage GRID):
TAG_REPORT_DIR = "xfer.report_dir"            # where its report was written
TAG_SKIPPED_IMAGES = "xfer.skipped_images"    # images --skip-bad-images left out (listed in skipped_images.txt)

# Estimate runs (stage ESTIMATE): one per pretrained model × target, tagged TAG_SOURCE / TAG_TARGET / TAG_ARCH /
# TAG_SEED / TAG_PRETRAIN_RUN; metrics: each of xfer.estimators.ESTIMATORS by its own name ("leep", "nce", "h_score",
# "logme"), its seconds as "<name>_seconds", and the two below (plus SECONDS, the whole cell).
ESTIMATE_EXAMPLES = "examples"            # target training images the model was scored on
FEATURES_SECONDS = "features_seconds"     # the forward pass that gives the estimators their inputs
# Experiment tag: the sources --prune-sources left out of fine-tuning, as JSON {"k", "by", "groups": [{"target",
# "arch", "kept", "skipped", "scores"}]} ("" when the last grid pruned none).
TAG_PRUNED = "xfer.pruned_sources"

# Adder runs (stage ADDER): which side of the transfer-vs-scratch comparison a run is on.
TAG_VARIANT = "variant"
VARIANT_TRANSFER = "transfer"             # from a pretrained digit classifier's logits (the seed's head)
VARIANT_TRANSFER_FEATURES = "transfer_features"   # from its penultimate features, under the scratch arm's head
VARIANT_SCRATCH = "scratch"               # a CNN from random initialisation

# Tuning (stage TUNE, xfer.tuning): one parent run per Optuna study, one child run per trial.
TAG_STUDY = "xfer.study"                  # the study's key, on its parent run and on every trial run
TAG_TUNE_ROLE = "xfer.tune_role"          # TUNE_ROLE_STUDY on the parent, TUNE_ROLE_TRIAL on each child
TUNE_ROLE_STUDY = "study"
TUNE_ROLE_TRIAL = "trial"
TAG_BEST_PREFIX = "xfer.best."            # + a searched TrainSpec field: the best configuration's value, on the parent
TAG_BEST_TRIAL = "xfer.best_trial"        # Optuna number of the best trial
TAG_TRIALS = "xfer.trials"                # finished trials in the study when the parent was last written
TAG_OPTUNA_STUDY = "xfer.optuna_study"    # the Optuna study name ...
TAG_OPTUNA_STORAGE = "xfer.optuna_storage"  # ... and its storage URL, password hidden
BEST_VAL_ERROR = "best_val_error"         # parent-run metrics: the best and the default configuration,
BEST_TEST_ERROR = "best_test_error"       # validation error from the search, test error measured once after it
DEFAULT_VAL_ERROR = "default_val_error"
DEFAULT_TEST_ERROR = "default_test_error"
BEST_CONFIG_FILE = "best_config.json"     # parent-run artifacts (also under <runs>/studies/<study name>/)
IMPORTANCE_FILES = ("importance.csv", "importance.md", "importance.png")
STUDY_FIGURE = "study.png"                # validation error by trial; default vs best, validation and test
TRIALS_FILE = "trials.csv"
