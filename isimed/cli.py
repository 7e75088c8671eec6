"""Command-line entry points, one implementation each; setup.cfg installs them as console scripts
and `main.py` / `linear_eval.py` call the first and the fifth:

  isimed-pretrain      (python main.py)         pretraining with any config
  isimed-simclr, isimed-vicreg, isimed-barlow     pretraining with that method only (default
                                                 config: configs/isimed_chest.py:method=<method>;
                                                 `method=<method>` is added to a --config without)
  isimed-linear-eval   (python linear_eval.py)  linear evaluation of a checkpoint
  isimed-prepare       (python -m isimed.data.prepare)
  isimed-export                                  the encoder as npz, safetensors or MONAI weights
  isimed-locate                                  the anatomy at points of one scan found in another
  isimed-finetune      (python finetune.py)     fine-tuning a pretrained encoder with few labels

`--workdir` defaults to `workdirs/<config name>[_<preset>][_<method>][_head]` for pretraining
(`default_workdir`) and to `<pretrain_workdir>/linear_eval` for linear evaluation.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import signal
import sys
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from isimed import errors
from isimed import export
from isimed import finetune
from isimed import runtime
from isimed import train
from isimed import workdir as workdir_layout
from isimed.evaluation import linear_eval

FLAGS = flags.FLAGS

# The repository's configs/ folder (present in a source checkout and an editable install; a
# non-editable install has no configs and needs --config).
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPOSITORY, "configs")
# Pretraining commands that fix their method.
METHOD_COMMANDS = {"simclr": "isimed-simclr", "vicreg": "isimed-vicreg", "barlow": "isimed-barlow"}


def default_workdir(config_arg: str) -> str:
    """`workdirs/<config file name>[_<preset>][_<method>][_head]` for `--config=PATH/NAME.py[:ARG]`
    (ARG as `configs/common.py` reads it), whatever the order of ARG's tokens: the preset if given,
    the method unless ISImed, `_head` for head=true. E.g. `configs/isimed_chest.py:demo` ->
    `workdirs/isimed_chest_demo`, `configs/isimed_chest.py` -> `workdirs/isimed_chest`,
    `configs/isimed_chest.py:method=simclr,demo` -> `workdirs/isimed_chest_demo_simclr`,
    `configs/isimed_chest.py:demo,head=true` -> `workdirs/isimed_chest_demo_head`."""
    path, _, arg = config_arg.partition(":")
    parts = [os.path.splitext(os.path.basename(path))[0]]
    tokens = dict(t.partition("=")[::2] if "=" in t else ("preset", t) for t in _tokens(arg))
    if tokens.get("preset"):
        parts.append(tokens["preset"])
    if tokens.get("method", "isimed") != "isimed":
        parts.append(tokens["method"])
    if tokens.get("head") == "true":
        parts.append("head")
    return os.path.join("workdirs", "_".join(parts))


def _tokens(arg: str) -> list[str]:
    return [t.strip() for t in arg.split(",") if t.strip()]


def with_method(config_arg: str, method: str, command: str) -> str:
    """`config_arg` (`PATH.py[:ARG]`) with `method=<method>` added to ARG where it names no method;
    SystemExit where it names another."""
    path, _, arg = config_arg.partition(":")
    tokens = _tokens(arg)
    named = [t.partition("=")[2] for t in tokens if t.partition("=")[0] == "method"]
    if any(m != method for m in named):
        raise SystemExit(
            f"{command} trains {method}, but --config={config_arg} names method={named[0]}; "
            f"drop it, or use isimed-pretrain (python main.py) for other methods"
        )
    if not named:
        tokens.append(f"method={method}")
    return f"{path}:{','.join(tokens)}"


def linear_eval_workdir(pretrain_workdir: str) -> str:
    """`<pretrain_workdir>/linear_eval` (`Workdir.linear_eval`), absolute (a URI stays a URI)."""
    return os.fspath(workdir_layout.Workdir(pretrain_workdir).linear_eval)


def default_config(method: str) -> str | None:
    """The repository's `configs/isimed_chest.py:method=<method>`, or None where there is no
    configs/ folder."""
    path = os.path.join(CONFIG_DIR, "isimed_chest.py")
    return f"{path}:method={method}" if os.path.isfile(path) else None


def check_method(config, method: str, config_arg: str, command: str) -> None:
    """SystemExit unless `config` trains `method`."""
    if config.method != method:
        raise SystemExit(
            f"{command} trains {method}, but --config={config_arg} is a {config.method!r} config; "
            f"use a config that takes method={method}, or isimed-pretrain (python main.py) for other methods"
        )


# Pretraining ------------------------------------------------------------------------------------


def run_pretrain() -> None:
    """`isimed-pretrain` and `python main.py`: pretraining with any config."""
    _pretrain(None, os.path.basename(sys.argv[0]))


def run_simclr() -> None:
    _pretrain("simclr", METHOD_COMMANDS["simclr"])


def run_vicreg() -> None:
    _pretrain("vicreg", METHOD_COMMANDS["vicreg"])


def run_barlow() -> None:
    _pretrain("barlow", METHOD_COMMANDS["barlow"])


def _pretrain(method: str | None, command: str) -> None:
    runtime.tune_malloc_for_cpu()  # Before JAX starts: glibc keeps XLA:CPU's step buffers mapped.
    default = default_config(method) if method else None
    if method:
        _add_method(sys.argv, method, command)
    _make_configs_importable(sys.argv, default)
    _check_config_arguments(sys.argv, command)
    help_default = f" (default: configs/isimed_chest.py:method={method}, paper scale)" if method else ""
    config_flags.DEFINE_config_file(
        "config",
        default,
        f"Pretraining config file, `PATH.py[:PRESET][,method=M][,head=true]`{help_default}.",
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Directory for checkpoints, logs and results; resumes from it "
        "(default: workdirs/<config name>[_<preset>][_<method>][_head]).",
    )
    app.run(functools.partial(_pretrain_main, method=method, command=command))


def _pretrain_main(argv: Sequence[str], *, method: str | None, command: str) -> None:
    _no_arguments(argv)
    if FLAGS.config is None:
        where = (
            f" (configs/isimed_chest.py, the default, is not at {CONFIG_DIR}: install from a "
            "source checkout with `pip install -e .`)"
            if method
            else ""
        )
        raise SystemExit(f"{command}: pass --config=PATH/CONFIG.py[:PRESET]{where}")
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    _check_config_file(config_arg, command)
    if method is not None:
        check_method(FLAGS.config, method, config_arg, command)
    workdir = FLAGS.workdir or default_workdir(config_arg)
    print(
        f"workdir: {workdir}" + ("" if FLAGS.workdir else " (from --config; set --workdir to change)"),
        flush=True,
    )
    _quiet_library_logs()
    try:
        summary = train.train_and_evaluate(FLAGS.config, workdir)
    except errors.UserError as e:  # The message says what to do; a traceback would bury it.
        raise SystemExit(f"{command}: {e}") from None
    if "preempted_at_step" in summary:
        _ignore_further_signals()
    print(train.format_summary(summary))


# Linear evaluation ------------------------------------------------------------------------------


def run_linear_eval() -> None:
    """`isimed-linear-eval` and `python linear_eval.py`."""
    _make_configs_importable(sys.argv, None)
    _check_config_arguments(sys.argv, os.path.basename(sys.argv[0]))
    config_flags.DEFINE_config_file(
        "config", None, "Linear-evaluation config file, `PATH.py[:PRESET]`.", lock_config=True
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Directory for results.json and results.md (default: <pretrain_workdir>/linear_eval).",
    )
    app.run(functools.partial(_linear_eval_main, command=os.path.basename(sys.argv[0])))


def _linear_eval_main(argv: Sequence[str], *, command: str) -> None:
    _no_arguments(argv)
    config = FLAGS.config
    if config is None:
        raise SystemExit(f"{command}: pass --config=PATH/linear_eval_*.py[:PRESET]")
    _check_config_file(config_flags.get_config_filename(FLAGS["config"]), command)
    if FLAGS.workdir:
        workdir = FLAGS.workdir
    elif config.pretrain_workdir:
        workdir = linear_eval_workdir(config.pretrain_workdir)
        print(f"workdir: {workdir} (from --config.pretrain_workdir; set --workdir to change)", flush=True)
    else:
        raise SystemExit(f"{command}: pass --config.pretrain_workdir=DIR (the pretraining --workdir)")
    _quiet_library_logs()
    results = linear_eval.evaluate(config, workdir)
    print(linear_eval.format_results(results))


# Fine-tuning -------------------------------------------------------------------------------------


def run_finetune() -> None:
    """`isimed-finetune` and `python finetune.py`: fine-tuning a pretrained encoder with few labels."""
    runtime.tune_malloc_for_cpu()
    _make_configs_importable(sys.argv, None)
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Fine-tuning config file, `PATH.py[:PRESET][,mode=linear|full][,init=pretrained|random|export]"
        "[,fraction=F|subjects=N]`.",
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Directory for checkpoints, logs and results.json; resumes from it "
        "(default: <pretrain_workdir>/finetune_<mode>_<fraction>[_<init>]).",
    )
    app.run(functools.partial(_finetune_main, command=os.path.basename(sys.argv[0])))


def _finetune_main(argv: Sequence[str], *, command: str) -> None:
    _no_arguments(argv)
    config = FLAGS.config
    if config is None:
        raise SystemExit(f"{command}: pass --config=PATH/finetune_*.py[:PRESET,...]")
    _check_config_file(config_flags.get_config_filename(FLAGS["config"]), command)
    try:
        workdir = FLAGS.workdir or finetune.default_workdir(config)
        if not FLAGS.workdir:
            print(f"workdir: {workdir} (from --config; set --workdir to change)", flush=True)
        _quiet_library_logs()
        results = finetune.finetune(config, workdir)
    except errors.UserError as e:  # The message says what to do; a traceback would bury it.
        raise SystemExit(f"{command}: {e}") from None
    if "preempted_at_step" in results:
        _ignore_further_signals()  # As pretraining: the exit stays 0.
    print(finetune.format_results(results))


# Data preparation and export --------------------------------------------------------------------


def run_prepare() -> None:
    """`isimed-prepare`: the same flags and main as `python -m isimed.data.prepare`."""
    from isimed.data import prepare

    prepare.define_flags()
    app.run(prepare.main)


def run_export() -> None:
    """`isimed-export --workdir=DIR --format=npz|safetensors|monai [--step=N] [--out=PATH]`."""
    flags.DEFINE_string("workdir", None, "Pretraining workdir (its checkpoints/ folder).")
    flags.DEFINE_enum("format", "npz", list(export.FORMATS), "npz | safetensors | monai (DenseNet-121).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string(
        "out", None, "Output file (default: <workdir>/export/encoder_step<N>.<npz|safetensors|pt>)."
    )
    flags.mark_flags_as_required(["workdir"])
    app.run(_export_main)


def _export_main(argv: Sequence[str]) -> None:
    _no_arguments(argv)
    _quiet_library_logs(logging.ERROR)  # Not even orbax's read-only-manager warnings.
    try:
        result = export.export(FLAGS.workdir, FLAGS.format, step=FLAGS.step, out=FLAGS.out)
    except (FileNotFoundError, ValueError, ImportError) as e:  # Bad input: a message, no traceback.
        raise SystemExit(f"isimed-export: {e}") from None
    print(f"wrote {result['path']} ({result['format']}, step {result['step']}, {result['arrays']} arrays)")
    if "sidecar" in result:
        print(f"wrote {result['sidecar']} (config and MONAI DenseNet121 arguments)")


# Localisation -----------------------------------------------------------------------------------


def run_locate() -> None:
    """`isimed-locate --workdir=W --template=A --target=B --points=P.csv --out=Q.csv [--step=N]
    [--plot=DIR]`: the anatomy at P's points of scan A found in scan B (`isimed.locate`)."""
    flags.DEFINE_string("workdir", None, "Pretraining workdir (its checkpoints/ folder).")
    flags.DEFINE_string("template", None, "Scan the points are in: NIfTI, NRRD, DICOM file or folder.")
    flags.DEFINE_string("target", None, "Scan to find them in (same formats).")
    flags.DEFINE_string("points", None, "CSV with x, y, z columns (world mm, RAS); others kept.")
    flags.DEFINE_string("out", None, "CSV written: --points rows, x, y, z found, + score.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("plot", None, "Folder for one PNG per point (slices and the cost map).")
    flags.DEFINE_integer("stride", 3, "Voxels between the crops of the coarse grid.")
    flags.DEFINE_float("offset_mm", 12.0, "Distance of the 6 extra query crops around a point (0: one crop).")
    flags.DEFINE_enum("intensity", None, ["ct", "mri", "uint8"], "Override prepared.json's intensity.")
    flags.DEFINE_list("window", None, "Override: CT HU window LO,HI.")
    flags.DEFINE_float("spacing", None, "Override: mm per voxel (0: each scan's own grid).")
    flags.DEFINE_integer("align_rounds", 3, "Rounds aligning the target to the template's pose (0: none).")
    flags.DEFINE_boolean("cache", True, "Keep embedded grids in <out folder>/locate_cache/ for reuse.")
    flags.mark_flags_as_required(["workdir", "template", "target", "points", "out"])
    app.run(_locate_main)


def _locate_main(argv: Sequence[str]) -> None:
    from isimed import locate

    _no_arguments(argv)
    _quiet_library_logs(logging.ERROR)
    spacing = FLAGS.spacing
    normalisation = {
        "intensity": FLAGS.intensity,
        "window": [float(v) for v in FLAGS.window] if FLAGS.window else None,
        "spacing": None if spacing is None else ([spacing] * 3 if spacing > 0 else 0),
    }
    try:
        result = locate.locate_files(
            FLAGS.workdir,
            FLAGS.template,
            FLAGS.target,
            FLAGS.points,
            FLAGS.out,
            step=FLAGS.step,
            stride=FLAGS.stride,
            offset_mm=FLAGS.offset_mm,
            align_rounds=FLAGS.align_rounds,
            normalisation=normalisation,
            plot_dir=FLAGS.plot,
            cache=FLAGS.cache,
        )
    except (locate.LocateError, FileNotFoundError, ValueError) as e:  # Bad input: one line.
        raise SystemExit(f"isimed-locate: {' '.join(str(e).split())}") from None
    print(
        f"wrote {result['out']} ({result['points']} points; embedding {result['embed_template_s']:.1f} s "
        f"+ {result['embed_target_s']:.1f} s, pose {result.get('align_s', 0.0):.1f} s, "
        f"matching {result['match_s']:.1f} s)"
    )


# Helpers ----------------------------------------------------------------------------------------


def _config_values(argv: Sequence[str]) -> list[tuple[int, str]]:
    """`(index, prefix)` of each `--config` value in `argv`: `argv[index]` is `prefix + value`
    (`--config=V`, prefix "--config=", or `--config V`, prefix ""; not `--config.x=...`)."""
    found = []
    for i, arg in enumerate(argv):
        match = re.fullmatch(r"(--?config=).*|--?config", arg)
        if match and match.group(1):
            found.append((i, match.group(1)))
        elif match and i + 1 < len(argv):
            found.append((i + 1, ""))
    return found


def _add_method(argv: list[str], method: str, command: str) -> None:
    """Rewrites each `--config` value in place to name `method` (`with_method`), before the flags
    are parsed, so the config is built for the command's method."""
    for i, prefix in _config_values(argv):
        argv[i] = prefix + with_method(argv[i][len(prefix) :], method, command)


def _make_configs_importable(argv: Sequence[str], default: str | None) -> None:
    """Config files import `configs.common`: puts the folder holding the config's `configs/`
    folder on sys.path (a console script's sys.path has neither the repository nor the cwd)."""
    found = [default.partition(":")[0]] if default else []
    for i, prefix in _config_values(argv):
        found.append(argv[i][len(prefix) :].partition(":")[0])
    for path in found:
        root = os.path.dirname(os.path.dirname(os.path.abspath(os.path.expanduser(path))))
        if os.path.isdir(os.path.join(root, "configs")) and root not in sys.path:
            sys.path.insert(0, root)


def _check_config_arguments(argv: Sequence[str], command: str) -> None:
    """SystemExit with the one line a config file's `get_config` raises for a bad argument (an
    unknown preset, method or key), before absl would wrap it in a traceback. Files that do not
    exist are left to `_check_config_file`."""
    for i, prefix in _config_values(argv):
        config_arg = argv[i][len(prefix) :]
        path, _, arg = config_arg.partition(":")
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            continue
        spec = importlib.util.spec_from_file_location("_isimed_config_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.get_config(*([arg] if arg else []))
        except ValueError as e:
            raise SystemExit(f"{command}: --config={config_arg}: {e}") from None


def _check_config_file(config_arg: str, command: str) -> None:
    """SystemExit naming a --config file that does not exist: ml_collections hands on a config
    whose every field then reads as missing, which validation would list as 16 problems."""
    path = os.path.abspath(os.path.expanduser(config_arg.partition(":")[0]))
    if not os.path.isfile(path):
        raise SystemExit(f"{command}: --config={config_arg}: no such file {path}")


def _ignore_further_signals() -> None:
    """After a preemption saved and the run returned: the rest of a burst of signals must not
    kill the process while the interpreter shuts down (it resets Python handlers, not ignored
    signals), so the exit stays 0."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def _no_arguments(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")


def _quiet_library_logs(level: int = logging.WARNING) -> None:
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(level)  # Library INFO logs (orbax, tfds) drown progress.
