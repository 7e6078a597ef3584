"""Configs: the schema with defaults, loading `file.py[:arg]`, overrides, checks.

Every config file starts from ``base_config()``, a *locked* ConfigDict holding
every known field: a misspelt field in a config file or on the command line is
an error that names it (with a suggestion), never a silently ignored value.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
from typing import Any, Sequence

import ml_collections

from vlm_jax import evaluators, losses, models, objectives, optim
from vlm_jax import workdir as workdir_lib
from vlm_jax.data import images, tokenizers
from vlm_jax.errors import ConfigError, first_line, require, unknown_field

ConfigDict = ml_collections.ConfigDict
eval_entry = evaluators.entry  # config files: config.evals.<name> = eval_entry("zeroshot", splits=(...), ...)

__all__ = ["ConfigDict", "ConfigError", "base_config", "eval_entry", "load_config", "from_file", "apply_overrides",
           "check_config", "check_against_mesh"]


def _declared_fields(mapping: dict[str, Any], section: str, **fields: Any) -> dict[str, Any]:
    """``fields`` plus the union of the ``CONFIG`` fields each entry of
    ``mapping`` (objectives, towers) declares for ``config.<section>``."""
    for name, cls in mapping.items():
        for key, value in cls.CONFIG.items():
            if key in fields and fields[key] != value:
                raise ValueError(f"{name!r} redefines config.{section}.{key} with another default")
            fields[key] = value
    return fields


def base_config() -> ConfigDict:
    """All fields with their defaults: a tiny CLIP on the embedded shapes data."""
    c = ConfigDict()
    c.seed = 0

    c.data = ConfigDict()
    c.data.dataset = "vlm_shapes"  # the embedded dataset, or any prepared TFDS name
    c.data.dataset_config = "default"
    c.data.data_dir = "./data"
    c.data.train_split = "train"
    c.data.index_file = ""  # a curated index of the train split (python -m vlm_jax.curate): train on its kept ids
    c.data.index_weights = False  # weight each pair's loss by the index's weights (curate --weight_floor)
    c.data.image_key = "image"
    c.data.text_key = "caption"
    c.data.label_key = "label"  # ClassLabel feature (UniCL's labels; zero-shot's by default; "" for none)
    c.data.image_size = 32
    c.data.tokenizer = "sentencepiece"  # "sentencepiece" (.model) | "tokenizer_json" (tokenizer.json) | "bytes"
    c.data.tokenizer_path = ""  # "": the SentencePiece model fitted beside the dataset (embedded; ingest --fit_tokenizer)
    c.data.vocab_size = 128  # only used when fitting the embedded dataset's tokenizer
    # Images (vlm_jax.data.images): decoded from any mode to RGB uint8; evaluation
    # resizes the shorter side and centre-crops; training crops a random window
    # whose area fraction and aspect ratio (w/h) lie in these ranges (the field's
    # RandomResizedCrop / Inception crop: (0.08, 1) or (0.9, 1), (3/4, 4/3));
    # (1, 1) and (1, 1) make it the evaluation crop.
    c.data.crop_area = (1.0, 1.0)
    c.data.crop_ratio = (1.0, 1.0)
    c.data.flip = False  # training: mirror left-right with probability 1/2
    c.data.resample = "area"  # "area" | "bilinear" | "bicubic"
    c.data.num_threads = 2
    c.data.prefetch = 4
    c.data.workers = 0  # decoding processes (grain multiprocessing); 0 = threads of the training process
    c.data.cache_mib = 256  # keep the train split's examples, as read, in memory up to this many MiB (0: none)
    # Grounding (objectives that ask for "regions"; pipeline.regions): slots per example, and
    # the text of the background phrase that is paired with the patches outside every box.
    c.data.max_boxes = 4
    c.data.max_phrases = 2
    c.data.box_min_visible = 0.5  # a box less visible than this in a training crop leaves the loss
    c.data.background_phrase = "background"
    # Hard-negative captions (the "negative_text" field: NegCLIP): groups of interchangeable
    # words, e.g. (("red", "green", ...), ("circle", "square", ...)); a negative swaps one word within its group.
    c.data.negative_words = ()

    c.model = ConfigDict()
    c.model.embed_dim = 64
    c.model.image_projection = True  # False: pooled image features are the embedding (SigLIP)
    c.model.text_projection_bias = False
    c.model.dtype = "float32"  # compute dtype of the towers ("bfloat16": bf16 matmuls); losses stay float32
    c.model.param_dtype = "float32"  # storage dtype of the parameters ("bfloat16" halves them); log_t, b stay float32
    c.model.remat = "none"  # "none" | "full" | "dots" | "dots_with_batch": recompute block activations
    c.model.scan = False  # nn.scan over the blocks of each tower
    # The towers' attention projections (q, k, v, output) as one (tokens × width) matmul each: the same
    # parameters and function, and on a CPU no transposed copy before each kernel gradient (the
    # side-by-side's default-size step 4 % faster on 2 cores, docs/benchmarks.md); the kernel
    # gradients sum in another order, so a run differs from one without it in the last bits.
    c.model.projections_2d = False
    c.model.image = ConfigDict(_declared_fields(models.IMAGE_TOWERS, "model.image", tower="vit"))  # the tower, its fields
    c.model.text = ConfigDict(_declared_fields(models.TEXT_TOWERS, "model.text", tower="transformer"))

    c.loss = ConfigDict()
    c.loss.kind = "softmax"  # a key of vlm_jax.objectives.OBJECTIVES: softmax (CLIP), sigmoid (SigLIP), unicl, slip, filip
    c.loss.impl = "all_gather"  # "all_gather" | "ring" | "tiled" (see docs/losses.md)
    c.loss.tile = 0  # impl="tiled": rows and columns per tile, dividing the per-device batch; 0 = automatic
    c.loss.log_t_init = math.log(1 / 0.07)
    c.loss.update(_declared_fields(objectives.OBJECTIVES, "loss"))  # each objective's own (sigmoid: bias_init; slip: ssl_*)

    c.mesh = ConfigDict()
    c.mesh.data = -1  # devices on the data axis; -1 = all the fsdp axis leaves
    c.mesh.fsdp = 1  # devices over which large parameters and optimizer moments are split
    c.mesh.fsdp_min_size = 1 << 14  # arrays smaller than this stay replicated
    c.mesh.rules = ()  # ((regex over state paths, PartitionSpec as a tuple), ...) applied before the fsdp rule

    c.optim = ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.end_lr_fraction = 0.0
    c.optim.schedule = "cosine"  # after the warm-up: a key of optim.SCHEDULES ("cosine" | "wsd")
    c.optim.decay_fraction = 0.2  # "wsd": the last fraction of the steps, over which the rate decays linearly
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.grad_clip = 1.0
    c.optim.mu_dtype = ""  # dtype of Adam's first moment; "" = the parameters' dtype
    c.optim.lr_rules = ()  # ((regex over parameter paths, learning-rate multiplier), ...); first match wins

    c.train = ConfigDict()
    c.train.steps = 500
    c.train.batch_size = 128
    c.train.accum_steps = 1  # > 1: exact gradient accumulation over this many micro-batches
    c.train.log_every = 50
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 2
    c.train.eval_every = 250  # default frequency of config.evals entries with every=0; 0 = those never run
    c.train.progress = True
    c.train.nonfinite = "stop"  # a non-finite loss/gradient/update: "stop" (nothing after it is saved) | "skip" it
    c.train.max_skipped = 10  # nonfinite="skip": stop after more than this many non-finite steps in a row
    c.train.freeze = ()  # regexes of parameter paths to freeze: no gradient, no optimizer state, no decay

    # Partial initialisation from another run's checkpoint (LiT: the image tower).
    c.model_init = ConfigDict()
    c.model_init.workdir = ""  # "" = none
    c.model_init.step = -1  # -1 = its latest checkpoint
    c.model_init.rules = ()  # ((regex over this model's paths, replacement giving the source path), ...)

    # Evaluations: named entries (vlm_jax.evaluators); a config file may add
    # more with config.evals.<name> = eval_entry(kind, ...). Metric keys are
    # <kind>/<split>/<metric>, prefixed by the entry's name when two entries
    # of one kind evaluate the same split.
    c.evals = ConfigDict()
    # The class name alone: of "a {}", "a small {}", "a large {}" and their
    # ensembles it scored best on the validation split (docs/evaluation.md).
    c.evals.zeroshot = eval_entry("zeroshot", splits=("test_seen", "test_unseen"), templates=("a {}",),
                                  filter_key="single_class")
    c.evals.retrieval = eval_entry("retrieval", splits=("test_seen", "test_unseen"))
    # Probes learn classes from the train split, which never shows test_unseen's compositions.
    c.evals.linear_probe = eval_entry("linear_probe", splits=("test_seen",), filter_key="single_class",
                                      train_examples=5000)
    c.evals.fewshot = eval_entry("fewshot", splits=("test_seen",), filter_key="single_class", train_examples=5000)
    c.evals.compositional = eval_entry("compositional", splits=("test_seen", "test_unseen"))
    # Dense zero-shot on the embedded data's masks and boxes (a dataset with grounding features).
    c.evals.segmentation = eval_entry("segmentation", splits=("test_seen", "test_unseen"))
    c.evals.detection = eval_entry("detection", splits=("test_seen", "test_unseen"))
    c.lock()
    c.evals.unlock()  # entries may be added; each entry stays locked (a misspelt field is an error)
    for e in c.evals.values():
        e.lock()
    return c


# --------------------------------------------------------------------------- loading


def _resolve(config: ConfigDict, dotted: str) -> tuple[ConfigDict, str]:
    parts = dotted.split(".")
    node, walked = config, "config"
    for p in parts[:-1]:
        if not isinstance(node, ConfigDict) or p not in node:
            raise unknown_field(f"{walked}.{p}", p, node.keys() if isinstance(node, ConfigDict) else [])
        node, walked = node[p], f"{walked}.{p}"
    if not isinstance(node, ConfigDict) or parts[-1] not in node:
        raise unknown_field(f"config.{dotted}", parts[-1], node.keys() if isinstance(node, ConfigDict) else [])
    return node, parts[-1]


def _parse_value(field: str, text: str, current: Any) -> Any:
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"config.{field}: cannot parse {text!r} as {type(current).__name__}") from None
    if isinstance(current, bool) != isinstance(value, bool) and current is not None:
        raise ConfigError(f"config.{field}: expected {type(current).__name__}, got {text!r}")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
        value = tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"config.{field}: expected {type(current).__name__}, got {text!r}")
    return value


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Applies ``a.b.c=value`` strings (the part after ``--config.``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like --config.field=value")
        key, text = item.split("=", 1)
        node, leaf = _resolve(config, key)
        if isinstance(node[leaf], ConfigDict):
            raise ConfigError(f"config.{key} is a section, not a value")
        node[leaf] = _parse_value(key, text, node[leaf])
    return config


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads ``path.py[:arg]`` (calling ``get_config(arg)``), applies overrides, checks."""
    path, _, arg = spec.partition(":")
    config = from_file(path, arg)
    apply_overrides(config, overrides)
    check_config(config)
    return config


def _as_tuples(value: Any) -> Any:
    """JSON's lists back to the tuples the schema holds."""
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    return value


def _fill(node: ConfigDict, recorded: dict, prefix: str) -> None:
    for key, value in recorded.items():
        field = f"{prefix}.{key}" if prefix else key
        if key not in node:
            raise ConfigError(f"config.{field}: the run recorded this field, which this version of vlm_jax does "
                              f"not have; evaluate it with the version that trained it")
        if isinstance(node[key], ConfigDict) != isinstance(value, dict):
            raise ConfigError(f"config.{field}: the run recorded {value!r}, and this version of vlm_jax's field "
                              f"is {'a section' if isinstance(node[key], ConfigDict) else 'a value'}; evaluate "
                              f"it with the version that trained it")
        if isinstance(node[key], ConfigDict):
            _fill(node[key], value, field)
            continue
        try:
            node[key] = _as_tuples(value)
        except TypeError as e:
            raise ConfigError(f"config.{field}: the run recorded {value!r}, which this version of vlm_jax's "
                              f"field does not take ({first_line(e)}); evaluate it with the version that "
                              f"trained it") from None


def from_workdir(workdir: str) -> ConfigDict:
    """The config a training run recorded in ``workdir/config.json``, on
    this version's schema (fields added since keep their defaults),
    unchecked: a config file can start from a finished run
    (``configs/transfer.py``)."""
    path = os.path.join(os.path.expanduser(workdir), "config.json")
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--config: cannot read {path} ({e}); name a training run's workdir") from None
    config = base_config()
    recorded = {k: v for k, v in recorded.items() if k != workdir_lib.INPUTS}  # input digests, not fields
    entries = recorded.pop("evals", {})
    _fill(config, recorded, "")
    for name in list(config.evals.keys()):
        del config.evals[name]
    for name, e in entries.items():
        if not isinstance(e, dict) or "kind" not in e:
            raise ConfigError(f"config.evals.{name}: the run recorded {e!r}, an entry without a kind; {path} "
                              f"is not a vlm_jax training run's record")
        fields = {k: _as_tuples(v) for k, v in e.items() if k != "kind"}
        config.evals[name] = eval_entry(e["kind"], **fields)
    return config


def from_file(path: str, arg: str = "") -> ConfigDict:
    """``get_config(arg)`` of the config file at ``path``, unchecked: a config
    file can start from another one (``configs/vit.py`` from ``default.py``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no config file at {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_vlm_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path}, line {e.lineno}: syntax error ({e.msg}); fix the config file") from None
    except AttributeError as e:  # a locked ConfigDict rejects unknown fields this way
        raise ConfigError(f"{path}: {str(e).strip(chr(39))}") from e
    except Exception as e:  # the file's own code failed: name the file and the error, no traceback
        raise ConfigError(f"{path}: loading it raised {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except AttributeError as e:
        raise ConfigError(f"{path}: {str(e).strip(chr(39))}") from e
    except ConfigError:
        raise
    except Exception as e:
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"{path}: {call} raised {type(e).__name__}: {e}") from e
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config() must return a ConfigDict (start from vlm_jax.config.base_config())")
    return config


# --------------------------------------------------------------------------- checks


def _check_schema(config: ConfigDict, schema: ConfigDict, prefix: str) -> None:
    for key in config.keys():
        if key not in schema:
            raise unknown_field(f"{prefix}.{key}", key, schema.keys())
        if prefix == "config" and key == "evals":  # entries are checked against their kind's fields
            continue
        if isinstance(schema[key], ConfigDict):
            if not isinstance(config[key], ConfigDict):
                raise ConfigError(f"{prefix}.{key} must be a section")
            _check_schema(config[key], schema[key], f"{prefix}.{key}")


def check_config(config: ConfigDict) -> None:
    """Device-independent checks; ``check_against_mesh`` does the rest."""
    _check_schema(config, base_config(), "config")
    kinds = tuple(objectives.OBJECTIVES)
    require(config.loss.kind in kinds, "loss.kind", f"must be one of {kinds}, got {config.loss.kind!r}")
    require(config.loss.impl in losses.IMPLS, "loss.impl", f"must be one of {losses.IMPLS}, got {config.loss.impl!r}")
    require(config.loss.tile == 0 or config.loss.impl == "tiled", "loss.tile", "applies to loss.impl='tiled' only")
    require(config.loss.tile >= 0, "loss.tile", "must be 0 (automatic) or positive")
    objectives.OBJECTIVES[config.loss.kind].check(config)
    require(config.train.steps > 0, "train.steps", "must be positive")
    require(config.train.accum_steps > 0, "train.accum_steps", "must be positive")
    require(config.train.batch_size > 0, "train.batch_size", "must be positive")
    for f in ("log_every", "checkpoint_every", "keep_checkpoints"):
        require(config.train[f] > 0, f"train.{f}", "must be positive")
    require(config.train.nonfinite in ("stop", "skip"), "train.nonfinite",
            f"must be 'stop' or 'skip', got {config.train.nonfinite!r}")
    require(config.train.max_skipped >= 0, "train.max_skipped", "must be 0 or positive")
    require(config.train.eval_every >= 0, "train.eval_every", "must be 0 (no evaluation) or positive")
    _check_data(config.data)
    models.check(config)
    require(config.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"unknown dtype {config.model.dtype!r}")
    require(config.model.param_dtype in ("float32", "bfloat16"), "model.param_dtype",
             f"must be 'float32' or 'bfloat16', got {config.model.param_dtype!r}")
    require(config.optim.schedule in optim.SCHEDULES, "optim.schedule",
            f"must be one of {sorted(optim.SCHEDULES)}, got {config.optim.schedule!r}")
    require(0 < config.optim.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")
    require(config.optim.mu_dtype in ("", "float32", "bfloat16"), "optim.mu_dtype",
             f"must be '', 'float32' or 'bfloat16', got {config.optim.mu_dtype!r}")
    require(config.mesh.data == -1 or config.mesh.data > 0, "mesh.data", "must be -1 (all devices) or positive")
    require(config.mesh.fsdp > 0, "mesh.fsdp", "must be positive")
    patterns = [("train.freeze", i, p) for i, p in enumerate(config.train.freeze)]
    patterns += [("optim.lr_rules", i, r[0]) for i, r in enumerate(config.optim.lr_rules) if isinstance(r, (tuple, list)) and r]
    patterns += [("model_init.rules", i, r[0]) for i, r in enumerate(config.model_init.rules) if isinstance(r, (tuple, list)) and r]
    for field, i, pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"config.{field}[{i}]: {pattern!r} is not a regular expression ({e})") from None
    for i, rule in enumerate(config.optim.lr_rules):
        require(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[1], (int, float)),
                 f"optim.lr_rules[{i}]", f"must be (regex, multiplier), got {rule!r}")
    for i, rule in enumerate(config.model_init.rules):
        require(isinstance(rule, (tuple, list)) and len(rule) == 2, f"model_init.rules[{i}]",
                 f"must be (regex, replacement), got {rule!r}")
    require(not config.model_init.workdir or bool(config.model_init.rules), "model_init.rules",
             "name which parameters to load from model_init.workdir")
    evaluators.check(config)


def _check_data(data: ConfigDict) -> None:
    require(data.tokenizer in tokenizers.KINDS, "data.tokenizer", f"must be one of {tokenizers.KINDS}, got {data.tokenizer!r}")
    require(data.resample in images.RESAMPLE, "data.resample", f"must be one of {tuple(images.RESAMPLE)}, got {data.resample!r}")
    for field, top in (("crop_area", 1.0), ("crop_ratio", None)):
        r = data[field]
        ok = isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r)
        ok = ok and 0 < r[0] <= r[1] and (top is None or r[1] <= top)
        require(ok, f"data.{field}", f"must be (low, high) with 0 < low <= high{' <= 1' if top else ''}, got {r!r}")
    require(data.workers >= 0, "data.workers", "must be 0 (threads only) or a number of processes")
    require(isinstance(data.cache_mib, int) and data.cache_mib >= 0, "data.cache_mib",
            f"must be a whole number of MiB, 0 for no cache, got {data.cache_mib!r}")
    require(data.max_boxes > 0 and data.max_phrases > 0, "data.max_boxes",
            "max_boxes and max_phrases must be positive")
    require(0.0 < data.box_min_visible <= 1.0, "data.box_min_visible", "must be in (0, 1]")


def check_against_mesh(config: ConfigDict, num_data_devices: int) -> None:
    require(
        config.train.batch_size % num_data_devices == 0,
        "train.batch_size",
        f"{config.train.batch_size} is not divisible by the {num_data_devices} data-parallel devices",
    )
    if config.loss.impl == "tiled" and config.loss.tile:
        b = config.train.batch_size // num_data_devices
        require(b % config.loss.tile == 0, "loss.tile",
                f"{config.loss.tile} does not divide the per-device batch {b} (train.batch_size="
                f"{config.train.batch_size} over {num_data_devices} devices); pick a divisor of {b}, or 0 (automatic)")
    k = config.train.accum_steps
    require(
        config.train.batch_size % (num_data_devices * k) == 0,
        "train.accum_steps",
        f"{k} micro-batches of train.batch_size={config.train.batch_size} do not split evenly over "
        f"{num_data_devices} devices (needs batch_size divisible by {num_data_devices * k})",
    )
