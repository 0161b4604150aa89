"""BLUEHyperParams: the one configuration object of the plugin.

Keys follow EasyEdit's MEMIT / AlphaEdit YAML names, so an existing EasyEdit YAML converts by
setting ``alg_name: BLUE`` and adding ``base_method`` and ``blue``. Validation happens in
``__post_init__``; every problem raises :class:`~blue_plugin.errors.BLUEConfigError` (a
``ValueError``) that names the key and says what to change.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import BLUEConfigError
from .hparams_io import CONFIG_DIR, REQUIRED_YAML_KEYS, find_yaml, read_yaml_config, shipped_configs  # noqa: F401

logger = logging.getLogger(__name__)

BASE_METHODS = ("MEMIT", "RECT", "PRUNE", "AlphaEdit")
FACT_TOKENS = ("subject_last", "subject_first", "last")
LAYER_SELECTIONS = ("all", "dynamic")
DYNAMIC_CRITERIA = ("residual_norm", "steps", "update_norm")
DTYPES = ("float16", "bfloat16", "float32", "float64")
RECT_MASK_TIMINGS = ("batch", "layer")
PRUNE_TIMINGS = ("sequence", "batch")
MODES = ("original", "blue")
#: Keys a ``mode_overrides`` entry may not set: they choose the method or the mode itself.
NOT_OVERRIDABLE = ("alg_name", "base_method", "blue", "mode_overrides")
#: Base methods that add earlier batches' K_p K_p^T by default (``accumulate_keys: null``), as the
#: reference evaluations run them: MEMIT_seq and AlphaEdit; RECT and PRUNE run on plain MEMIT.
ACCUMULATING_BY_DEFAULT = ("MEMIT", "AlphaEdit")

# Keys that EasyEdit YAMLs of the base methods carry but that this plugin has no use for.
# They are accepted so that converted files load; a warning says they are ignored.
IGNORED_EASYEDIT_KEYS = ("P_loc", "fp16")

# Keys a hyperparameter file may leave out (``REQUIRED_YAML_KEYS`` it may not); a warning names the
# default used.
DEFAULTED_YAML_KEYS = ("base_method", "blue")


def _f(default: Any, help: str, kind: Any, **kw: Any) -> Any:
    """A dataclass field with help text and the accepted Python type(s) in metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, "kind": kind, **kw})
    return field(default=default, metadata={"help": help, "kind": kind, **kw})


_INT, _NUM, _STR, _BOOL = (int,), (int, float), (str,), (bool,)
_OPT_STR, _OPT_BOOL = (str, type(None)), (bool, type(None))


@dataclass
class BLUEHyperParams:
    """Hyperparameters of a BLUE (or original locate-then-edit) edit.

    ``layers`` are the critical layers. With ``blue: true`` only ``layers[0]`` and ``layers[-1]``
    are updated, each with a residual computed directly at that layer. With ``blue: false`` the
    target is computed at ``layers[-1]`` and its residual spread over all layers (the original
    method).

    The class knows nothing of EasyEdit; :func:`blue_plugin.integrations.easyedit.register_with_easyedit`
    hands EasyEdit a subclass that also derives from EasyEdit's ``HyperParams``.
    """

    # --- what to run ---------------------------------------------------------------------
    alg_name: str = _f("BLUE", "Must be 'BLUE' (EasyEdit dispatches on it).", _STR)
    base_method: str = _f("MEMIT", f"Update rule: one of {BASE_METHODS}.", _STR)
    blue: bool = _f(True, "True: BLUE (first and last layer, direct residuals); False: original method.", _BOOL)
    model_name: str = _f("smollm2-135m", "Model name or local Hugging Face folder.", _STR)
    device: Any = _f(None, "Where EasyEdit loads a model by name (an int means cuda:N there); the engine uses the weights' device.", (int, str, type(None)))
    layers: list = _f([4, 5, 6, 7, 8], "Critical layers, ascending, e.g. [4, 5, 6, 7, 8] or [4, 8].", (list,))
    layer_selection: str = _f("all", f"One of {LAYER_SELECTIONS}.", _STR)
    dynamic_window: int = _f(1, "layer_selection=dynamic: how far each boundary may move inward.", _INT)
    dynamic_criterion: str = _f("residual_norm", f"layer_selection=dynamic: criterion, one of {DYNAMIC_CRITERIA}.", _STR)
    fact_token: str = _f("subject_last", f"Token whose representation is edited: {FACT_TOKENS}.", _STR)
    use_chat_template: bool = _f(False, "Instruct models (EasyEdit's key): put each edit prompt (context prefix + prompt, "
        "and the KL prompt) into the tokenizer's chat template as one user message with the generation prompt; the "
        "target follows it. Measure with the same option (chat_template=True in blue_plugin.evaluation).", _BOOL)

    # --- target-value optimisation -------------------------------------------------------
    v_num_grad_steps: int = _f(25, "Maximum optimisation steps per target.", _INT)
    v_lr: float = _f(5e-1, "Adam learning rate of the target optimisation.", _NUM)
    v_loss_layer: int = _f(-1, "Layer whose output gives the loss (-1 or the last layer: the logits).", _INT)
    v_weight_decay: float = _f(0.5, "Weight decay on ||delta|| / ||h||^2 (MEMIT / AlphaEdit / BLUE: 0.5).", _NUM)
    clamp_norm_factor: float = _f(0.75, "||delta|| is clamped to this factor times ||h|| (MEMIT / AlphaEdit / BLUE: 0.75).", _NUM)
    kl_factor: float = _f(0.0625, "Weight of the KL term on '{subject} is a'.", _NUM)
    v_early_stop_loss: float = _f(5e-2, "A request stops optimising once its loss is below this.", _NUM)
    context_template_length_params: list = _f([[10, 5]], "Context prefixes: [[n_tokens, n_prefixes], ...] generated by the model.", (list,))
    seed: int = _f(0, "Seed for the context-template generation.", _INT)
    v_replay_lower_layers: bool = _f(True, "Compute the blocks up to the edited one once per target, not every step.", _BOOL)
    v_max_batch_tokens: int = _f(1024, "Padded tokens per forward/backward chunk of the target optimisation (with "
                                 "v_prefix_cache: the tokens a step runs, from the edited token on).", _INT)
    v_prefix_cache: bool = _f(True, "Run the optimisation steps from the edited token on, over cached keys/values of "
                              "the tokens before it.", _BOOL)

    # --- update rule ---------------------------------------------------------------------
    mom2_adjustment: bool = _f(True, "Use the key second moment C_0 in the solve.", _BOOL)
    mom2_update_weight: float = _f(15000.0, "lambda in (lambda C_0 + K K^T).", _NUM)
    accumulate_keys: Optional[bool] = _f(None, "MEMIT/RECT/PRUNE: add earlier batches' K_p K_p^T (MEMIT_seq). null: as "
        f"the reference evaluations ({', '.join(ACCUMULATING_BY_DEFAULT)} accumulate, RECT and PRUNE do not); AlphaEdit "
        "always accumulates.", _OPT_BOOL)
    nullspace_threshold: float = _f(2e-2, "AlphaEdit: eigenvalues of C_0 below this span the null space.", _NUM)
    L2: float = _f(10.0, "AlphaEdit: ridge term of the projected solve.", _NUM)
    rect_keep_fraction: float = _f(0.4, "RECT: fraction of update entries kept (by relative change).", _NUM)
    rect_mask_timing: str = _f("batch", f"RECT: when the top-k mask applies, one of {RECT_MASK_TIMINGS}. 'batch' "
        "(reference): the layers are walked with dense updates and each layer's update is masked when the batch is "
        "written; 'layer': each layer's update is masked before the next layer is computed.", _STR)
    prune_timing: str = _f("sequence", f"PRUNE: when the restraint applies, one of {PRUNE_TIMINGS}. 'sequence' "
        "(reference): once, to the accumulated change W_now - W_orig of the served weights (evaluation, save, export, "
        "finalize()); 'batch': after every batch and layer (not idempotent).", _STR)
    solve_dtype: str = _f("float64", "dtype of the closed-form solves.", _STR)

    # --- module templates (None = derived from model.config.model_type) -------------------
    rewrite_module_tmp: Optional[str] = _f(None, "FFN output projection, e.g. model.layers.{}.mlp.down_proj.", _OPT_STR)
    layer_module_tmp: Optional[str] = _f(None, "Transformer block, e.g. model.layers.{}.", _OPT_STR)
    mlp_module_tmp: Optional[str] = _f(None, "MLP module, e.g. model.layers.{}.mlp.", _OPT_STR)
    attn_module_tmp: Optional[str] = _f(None, "Attention module, e.g. model.layers.{}.self_attn.", _OPT_STR)
    ln_f_module: Optional[str] = _f(None, "Final norm, e.g. model.norm.", _OPT_STR)
    lm_head_module: Optional[str] = _f(None, "Output head, e.g. lm_head.", _OPT_STR)

    # --- statistics ------------------------------------------------------------------------
    mom2_dataset: str = _f("wikipedia", "Corpus for C_0 (as the references: wikipedia): wikipedia / wikitext (the "
        "`datasets` package and hub access), wordnet (Debian's wordnet-base glosses), sampled (text sampled from the "
        "model itself, needs no data), a combination such as wordnet+sampled, a local text file (one document per line) "
        "or a .jsonl with 'text'.", _STR)
    mom2_n_samples: int = _f(1000, "Number of corpus documents for C_0.", _INT)
    mom2_max_length: int = _f(128, "Tokens per corpus document (longer ones are truncated).", _INT)
    mom2_dtype: str = _f("float32", "dtype the keys are cast to before their products are formed (as MEMIT's layer_stats precision); "
        "the totals and C_0 are always float64.", _STR)
    stats_dir: Optional[str] = _f(None, "Cache folder for statistics (None: the user cache dir).", _OPT_STR)

    # --- EasyEdit bookkeeping --------------------------------------------------------------
    batch_size: int = _f(1, "Edits per batch when EasyEdit's batch_edit splits requests.", _INT)
    max_length: int = _f(40, "Maximum tokens of an edit prompt plus target.", _INT)
    model_parallel: bool = _f(False, "Kept for EasyEdit; layers may sit on different devices regardless.", _BOOL)

    # --- values per mode ---------------------------------------------------------------------
    mode_overrides: dict = _f({}, "Values in force in one mode only: {original: {key: value}, blue: {key: value}} (e.g. "
        "AlphaEdit's L2: 10 for the original method, the BLUE configs' own value with blue: true).", (dict,))

    def __post_init__(self) -> None:
        self._validate_types()
        self._apply_mode_overrides()
        self._validate_values()

    def _apply_mode_overrides(self) -> None:
        """Put the values of the active mode's ``mode_overrides`` in force; remember the values they
        replace (``to_dict`` writes those, so a round trip and a mode switch stay exact)."""
        names = {f.name for f in dataclasses.fields(self)}
        for mode, values in self.mode_overrides.items():
            if mode not in MODES:
                raise BLUEConfigError(f"'mode_overrides': modes are {MODES}, got {mode!r}.")
            if not isinstance(values, dict):
                raise BLUEConfigError(f"'mode_overrides.{mode}' must be a mapping of key: value, got {values!r}.")
            for key in values:
                if key in NOT_OVERRIDABLE:
                    raise BLUEConfigError(f"'mode_overrides.{mode}' may not set {key!r}; set it at the top level.")
                if key not in names:
                    close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise BLUEConfigError(f"'mode_overrides.{mode}': unknown hyperparameter {key!r}{hint}.")
        active = self.mode_overrides.get(self.mode, {})
        base = {key: getattr(self, key) for key in active}
        for key, value in active.items():
            setattr(self, key, copy.deepcopy(value))
        self._mode_base = base
        if active:
            self._validate_types()

    @property
    def mode(self) -> str:
        """``'blue'`` or ``'original'``: which entry of ``mode_overrides`` is in force."""
        return "blue" if self.blue else "original"

    # ---------------------------------------------------------------------------------------
    def _validate_types(self) -> None:
        for f in dataclasses.fields(self):
            kind = f.metadata.get("kind")
            if kind is None:
                continue
            value = getattr(self, f.name)
            if isinstance(value, str) and (float in kind or int in kind) and str not in kind:
                value = _maybe_number(f.name, value, integer=float not in kind)
                setattr(self, f.name, value)
            if bool in kind and not isinstance(value, kind):
                raise BLUEConfigError(f"'{f.name}' must be {_kind_name(kind)}, got {value!r}.")
            if bool not in kind and isinstance(value, bool):
                raise BLUEConfigError(f"'{f.name}' must be {_kind_name(kind)}, got {value!r}.")
            if not isinstance(value, kind):
                raise BLUEConfigError(f"'{f.name}' must be {_kind_name(kind)}, got {value!r} ({type(value).__name__}).")
            if kind is _NUM and float in kind and f.type in ("float", float):
                setattr(self, f.name, float(value))

    def _validate_values(self) -> None:
        def bad(key: str, msg: str) -> None:
            raise BLUEConfigError(f"'{key}': {msg}")

        if self.alg_name != "BLUE":
            bad("alg_name", f"must be 'BLUE' for BLUEHyperParams, got {self.alg_name!r}.")
        if self.base_method not in BASE_METHODS:
            lower = {m.lower(): m for m in BASE_METHODS}
            close = difflib.get_close_matches(str(self.base_method).lower(), list(lower), n=1, cutoff=0.3)
            hint = f" Did you mean {lower[close[0]]!r}?" if close else ""
            bad("base_method", f"must be one of {', '.join(BASE_METHODS)}, got {self.base_method!r}.{hint}")
        if not self.layers:
            bad("layers", "must list at least one critical layer, e.g. [4, 5, 6, 7, 8].")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers):
            bad("layers", f"must be a list of integers, got {self.layers!r}.")
        if any(x < 0 for x in self.layers):
            bad("layers", f"layer indices must be >= 0, got {self.layers!r}.")
        if len(set(self.layers)) != len(self.layers):
            bad("layers", f"contains duplicates: {self.layers!r}.")
        if list(self.layers) != sorted(self.layers):
            bad("layers", f"must be in ascending order, got {self.layers!r} (did you mean {sorted(self.layers)!r}?).")
        if self.layer_selection not in LAYER_SELECTIONS:
            bad("layer_selection", f"must be one of {LAYER_SELECTIONS}, got {self.layer_selection!r}.")
        if self.layer_selection == "dynamic" and not self.blue:
            bad("layer_selection", "'dynamic' only applies with blue: true.")
        if self.dynamic_criterion not in DYNAMIC_CRITERIA:
            bad("dynamic_criterion", f"must be one of {DYNAMIC_CRITERIA}, got {self.dynamic_criterion!r}.")
        if self.dynamic_window < 0:
            bad("dynamic_window", "must be >= 0.")
        if self.fact_token not in FACT_TOKENS:
            bad("fact_token", f"must be one of {FACT_TOKENS}, got {self.fact_token!r}.")
        for key in ("v_num_grad_steps", "v_max_batch_tokens", "mom2_n_samples", "batch_size", "max_length", "mom2_max_length"):
            if getattr(self, key) <= 0:
                bad(key, f"must be a positive integer, got {getattr(self, key)!r}.")
        for key in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, key) > 0:
                bad(key, f"must be > 0, got {getattr(self, key)!r}.")
        for key in ("v_weight_decay", "kl_factor", "mom2_update_weight", "nullspace_threshold", "L2", "v_early_stop_loss"):
            if not getattr(self, key) >= 0:
                bad(key, f"must be >= 0, got {getattr(self, key)!r}.")
        if self.rect_mask_timing not in RECT_MASK_TIMINGS:
            bad("rect_mask_timing", f"must be one of {RECT_MASK_TIMINGS}, got {self.rect_mask_timing!r}.")
        if self.prune_timing not in PRUNE_TIMINGS:
            bad("prune_timing", f"must be one of {PRUNE_TIMINGS}, got {self.prune_timing!r}.")
        if not 0.0 < self.rect_keep_fraction <= 1.0:
            bad("rect_keep_fraction", f"must be in (0, 1], got {self.rect_keep_fraction!r}.")
        for key in ("mom2_dtype", "solve_dtype"):
            if getattr(self, key) not in DTYPES:
                bad(key, f"must be one of {DTYPES}, got {getattr(self, key)!r}.")
        params = self.context_template_length_params
        if not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p) for p in params
        ):
            bad("context_template_length_params", f"must be a list of [n_tokens, n_prefixes] pairs, got {params!r}.")
        for key in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
            value = getattr(self, key)
            if value is not None and "{}" not in value:
                bad(key, f"must contain '{{}}' where the layer index goes, got {value!r}.")

    # ---------------------------------------------------------------------------------------
    @property
    def accumulates_keys(self) -> bool:
        """Whether earlier batches' K_p K_p^T enter the solve: ``accumulate_keys`` when set, else the
        reference behaviour of the base method; AlphaEdit always accumulates."""
        if self.base_method == "AlphaEdit":
            return True
        if self.accumulate_keys is None:
            return self.base_method in ACCUMULATING_BY_DEFAULT
        return self.accumulate_keys

    @property
    def edit_layers(self) -> list[int]:
        """Layers whose weights a (fixed-selection) edit changes."""
        if self.blue:
            return sorted({self.layers[0], self.layers[-1]})
        return list(self.layers)

    def replace(self, **changes: Any) -> "BLUEHyperParams":
        """A validated copy with some fields changed (``blue`` switches the mode, and with it the
        ``mode_overrides`` in force). Changing a key that the resulting mode overrides is an error:
        change it in ``mode_overrides`` instead, or it would be silently overridden."""
        config = self.to_dict()
        config.update(changes)
        overrides = config.get("mode_overrides") or {}
        mode = "blue" if config.get("blue") else "original"
        clash = sorted(k for k in changes if k in overrides.get(mode, {}) and "mode_overrides" not in changes)
        if clash:
            raise BLUEConfigError(
                f"{', '.join(map(repr, clash))} is set for the {mode!r} mode in mode_overrides, which would override "
                f"the new value; pass mode_overrides with the new value instead."
            )
        return type(self)(**config)

    def for_mode(self, blue: bool) -> "BLUEHyperParams":
        """A copy with ``blue`` set and that mode's ``mode_overrides`` in force: the configuration a
        comparison of BLUE (``True``) with the original method (``False``) runs for each side."""
        if not isinstance(blue, bool):
            raise BLUEConfigError(f"for_mode: blue must be True or False, got {blue!r}.")
        return self.replace(blue=blue)

    def to_dict(self) -> dict[str, Any]:
        """Every key as the configuration states it: the values outside ``mode_overrides`` plus
        ``mode_overrides`` itself (``from_dict(to_dict())`` gives an equal object). The values in
        force are the attributes."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out.update(copy.deepcopy(getattr(self, "_mode_base", {})))
        return out

    @classmethod
    def coerce(cls, hparams: Any) -> "BLUEHyperParams":
        """``hparams`` as a :class:`BLUEHyperParams`: an instance as it is, a dict of its keys, or a
        YAML path or shipped name (as :meth:`from_hparams`); anything else, or a path that names no
        file, is a :class:`~blue_plugin.errors.BLUEConfigError` that says how to make one."""
        if isinstance(hparams, BLUEHyperParams):
            return hparams
        if isinstance(hparams, dict):
            return cls.from_dict(hparams)
        how = "load one with BLUEHyperParams.from_hparams('smollm2-135m') or from_hparams('path/to/file.yaml')."
        if isinstance(hparams, (str, os.PathLike)):
            try:
                path = find_yaml(hparams)
            except BLUEConfigError as exc:
                raise BLUEConfigError(f"hparams must be a BLUEHyperParams, a dict of its keys or a YAML path: {exc} {how}") from None
            return cls.from_hparams(path)
        raise BLUEConfigError(
            f"hparams must be a BLUEHyperParams, a dict of its keys or a YAML path, got {type(hparams).__name__}; {how}"
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BLUEHyperParams":
        """Read a JSON file of hyperparameters (as EasyEdit's ``HyperParams.from_json``)."""
        try:
            with open(path, encoding="utf-8") as fh:
                config = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise BLUEConfigError(f"{path}: cannot read hyperparameters as JSON: {exc}") from exc
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "<dict>") -> "BLUEHyperParams":
        """Build from a mapping; unknown keys raise with a suggestion of the closest known key."""
        if not isinstance(config, dict):
            raise BLUEConfigError(f"{source}: expected a mapping of hyperparameters, got {type(config).__name__}.")
        names = [f.name for f in dataclasses.fields(cls)]
        config = dict(config)
        for key in IGNORED_EASYEDIT_KEYS:
            if key in config:
                logger.warning("%s: key %r is not used by blue_plugin and is ignored.", source, key)
                config.pop(key)
        unknown = [k for k in config if k not in names]
        if unknown:
            msgs = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
                msgs.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise BLUEConfigError(f"{source}: unknown hyperparameter(s) {', '.join(msgs)}.")
        return cls(**config)

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | os.PathLike) -> "BLUEHyperParams":
        """Read a YAML file and validate it. ``hparams_name_or_path`` is a path (the ``.yaml`` suffix
        may be omitted, as in EasyEdit) or the name of a configuration shipped with the package
        (``"smollm2-135m"``, ``"llama3-8b"``, ...; see :func:`shipped_configs`)."""
        path, config = read_yaml_config(hparams_name_or_path)
        if isinstance(config, dict):
            for key in DEFAULTED_YAML_KEYS:
                if key not in config:
                    default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
                    logger.warning("%s: %r is not set; using %r.", path, key, default)
        return cls.from_dict(config, source=str(path))


def _maybe_number(key: str, value: str, integer: bool) -> Any:
    """YAML reads '5e-1' (as EasyEdit files write it) as a string; turn it into a number."""
    try:
        number = float(value)
    except ValueError:
        raise BLUEConfigError(f"'{key}' must be a number, got {value!r}.") from None
    if integer:
        if not number.is_integer():
            raise BLUEConfigError(f"'{key}' must be an integer, got {value!r}.")
        return int(number)
    return number


def _kind_name(kind: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kind))
